"""Running the stages of a plan (data, architecture, pre-training, fine-tuning + evaluation), each once, with a
``stage_done.json`` marker. Part of :mod:`d2mae.experiment`."""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from d2mae.data.decode import compute_stats
from d2mae.data.labels import labels_inputs, load_labeled
from d2mae.data.phantom import generate_phantoms
from d2mae.data.sources import find_images
from d2mae.eval.evaluate import evaluate_run
from d2mae.experiment.config import ExperimentConfig
from d2mae.experiment.datasets import segment_set
from d2mae.experiment.estimate import estimate_plan
from d2mae.experiment.forbidden import LABEL_OPTIONS
from d2mae.experiment.methods import method_for
from d2mae.experiment.plan import (
    EXPERIMENT_CONFIG,
    PLAN_FILE,
    VIEW_IMAGES,
    VIEWS,
    Plan,
    Stage,
    format_plan,
    format_seconds,
    make_plan,
)
from d2mae.experiment.report import write_report
from d2mae.experiment.stage import DONE
from d2mae.io.artifacts import save_pretrained
from d2mae.io.imports import backbone_state, check_importable
from d2mae.method.backbones import BackboneConfig, backbone_classifier
from d2mae.method.model_config import ModelConfig, default_stats
from d2mae.method.models import DeblurMAE
from d2mae.runtime.device import resolve_device
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_json, atomic_write_text
from d2mae.runtime.locks import output_lock
from d2mae.runtime.logs import say
from d2mae.runtime.options import save_config
from d2mae.runtime.outputs import claim_folder
from d2mae.segment.evaluate import evaluate_segment_run
from d2mae.train.engine import DEFAULT_IMG_SIZE
from d2mae.train.pretrain import RESUME as PRETRAIN_RESUME
from d2mae.train.pretrain import pretrain
from d2mae.train.probe import probe
from d2mae.train.tasks import finetune, segment
from d2mae.view.page import build_experiment

# --------------------------------------------------------------------------------------------------------------------
# running the stages
# --------------------------------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    say(None, f"[experiment] {message}")


def _write_done(stage: Stage, seconds: float, extra: Mapping[str, Any] | None = None) -> None:
    atomic_write_json(stage.folder / DONE, {
        "stage": stage.label, "kind": stage.kind, "key": stage.key, "seconds": round(seconds, 3),
        "estimate_s": None if not math.isfinite(stage.estimate_s) else round(stage.estimate_s, 1),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(extra or {})})


def _clear_stale(folder: Path, keep_partial: bool) -> None:
    """A stage folder whose DONE marker belongs to another config (or is unreadable) is emptied before re-running;
    a folder without a marker is a stopped run of this stage and is kept (its own checkpoint resumes it)."""
    marker = folder / DONE
    if marker.exists() or (folder.exists() and not keep_partial):
        shutil.rmtree(folder)


def _run_data(stage: Stage, plan: Plan) -> None:
    if "list" in stage.payload:

        spec = plan.config.datasets[stage.dataset]
        labeled = segment_set(spec).labeled if spec.task == "segment" else load_labeled(
            spec.labels, **{k: getattr(spec, k) for k in LABEL_OPTIONS})
        atomic_write_text(stage.payload["list"], "".join(f"{r}\n" for r in labeled.refs))
        return

    _clear_stale(stage.folder, keep_partial=False)
    generate_phantoms(stage.folder, **{**stage.payload, "force": True})  # a stopped data stage is written again


def _run_arch(stage: Stage, plan: Plan) -> None:
    """The supervised floor's ViT: an untrained model folder with the experiment's architecture and the
    pre-training images' mean/std (fine-tuning ``--mode scratch`` reads only its config, not its weights)."""

    mc: ModelConfig = stage.payload["model"]
    if mc.mean is None or mc.std is None:
        mean, std = compute_stats(find_images(stage.payload["data"]), mc.in_chans, seed=0)
        mc = dataclasses.replace(mc, mean=mc.mean or mean, std=mc.std or std)
    torch.manual_seed(0)
    _clear_stale(stage.folder, keep_partial=False)
    save_pretrained(DeblurMAE(mc), stage.folder, extra={
        "scratch_architecture": True, "pretrain": {"preset": "none", "images": 0, "content_hashes": []},
        "note": "randomly initialised; only its architecture and normalisation are used (fine-tuning --mode "
                "scratch, the supervised floor)"})


def _run_pretrain(stage: Stage, plan: Plan) -> None:

    _clear_stale(stage.folder, keep_partial=True)
    pretrain(stage.payload)


def _run_finetune(stage: Stage, plan: Plan) -> None:

    _clear_stale(stage.folder, keep_partial=True)
    spec = plan.config.datasets[stage.dataset]
    rep = plan.config.report
    finetune(stage.payload)
    evaluate_run(stage.folder, n_bootstrap=rep.n_bootstrap, seed=0, confidence=rep.confidence,
                 group_by=[spec.scanner_column] if spec.scanner_column else [], figures=True)


def _run_segment(stage: Stage, plan: Plan) -> None:

    _clear_stale(stage.folder, keep_partial=True)
    segment(stage.payload)
    evaluate_segment_run(stage.folder, n_bootstrap=plan.config.report.n_bootstrap, seed=0)


def _run_probe(stage: Stage, plan: Plan) -> None:

    _clear_stale(stage.folder, keep_partial=False)  # seconds of work: a stopped probe starts again
    probe(stage.payload)


_RUNNERS: dict[str, Callable[[Stage, Plan], None]] = {
    "data": _run_data, "arch": _run_arch, "pretrain": _run_pretrain, "finetune": _run_finetune,
    "label_fraction": _run_finetune, "probe": _run_probe, "segment": _run_segment}


def run_stage(stage: Stage, plan: Plan, index: int = 0, total: int = 0) -> dict[str, Any]:
    """Run one stage unless its DONE marker (same config) exists; write the marker after the outputs."""
    where = f"[{index}/{total}] " if total else ""
    info = stage.done_info()
    if info is not None:
        _say(f"{where}{stage.label}: finished before, skipped ({stage.folder})")
        return {**info, "skipped": True}
    _say(f"{where}{stage.label} …")
    t0 = time.perf_counter()
    _RUNNERS[stage.kind](stage, plan)
    seconds = time.perf_counter() - t0
    _write_done(stage, seconds)
    if stage.kind == "pretrain":  # finished and marked: its resume state (3× the model's size) is of no more use
        (stage.folder / PRETRAIN_RESUME).unlink(missing_ok=True)
    _say(f"{where}{stage.label}: done in {format_seconds(seconds)}")
    return {**(stage.done_info() or {}), "skipped": False}


def prepare_out(plan: Plan, resume: bool) -> None:
    """Refuse to mix two experiments in one folder; save the resolved config and the plan."""

    out = plan.out
    previous = out / EXPERIMENT_CONFIG
    if previous.is_file() and not resume:
        raise D2maeError(f"{out} already holds an experiment ({previous}); continue it with --resume "
                         "(finished stages are skipped) or choose another --out", option="out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(plan.config.to_dict(), previous)
    atomic_write_json(out / PLAN_FILE, {"stages": [
        {"id": s.id, "kind": s.kind, "dataset": s.dataset, "label": s.label, "folder": str(s.folder), "key": s.key,
         "seed": s.seed, "method": s.method, "preset": s.preset,
         "estimate_s": None if not math.isfinite(s.estimate_s) else round(s.estimate_s, 1)} for s in plan.stages]})


def check_weights(plan: Plan) -> None:
    """Read every method's weights file (``weights:``) the way its fine-tuning will, before the first stage: a file
    that cannot be read safely, holds no fitting ViT or does not fit its timm model stops the experiment now, not
    after hours of training the methods before it."""
    seen: set[tuple[str, str]] = set()
    for stage in plan.of("finetune"):  # segmentation stages start from this experiment's own models
        fc = stage.payload
        weights = fc.backbone_weights if fc.backbone else (fc.pretrained if method_for(stage.method).source ==
                                                           "checkpoint" else None)
        if not weights or (stage.method, weights) in seen:
            continue
        seen.add((stage.method, weights))
        try:
            size = fc.img_size or DEFAULT_IMG_SIZE
            if fc.backbone:
                config = BackboneConfig(fc.backbone, size, fc.in_chans, *default_stats(fc.in_chans))
                state, _ = backbone_state(weights, config)
                backbone_classifier(config, plan.datasets[stage.dataset].num_classes, 0.0, state, weights)
            else:
                check_importable(weights, size, fc.in_chans)
        except D2maeError as exc:
            raise D2maeError(f"method {stage.method} cannot start: {exc.message}; nothing was trained — fix its "
                             "weights: entry or leave the method out") from None


def write_views(plan: Plan) -> Path | None:
    """A page per finished fine-tuning or segmentation run in ``OUT/views`` (:mod:`d2mae.view.page`), and their
    index; ``None`` (and a line saying why) when no run can be shown."""
    try:
        return build_experiment(plan.out, plan.out / VIEWS, max_images=VIEW_IMAGES, progress=False,
                                device=resolve_device(plan.config.device))
    except D2maeError as e:
        _say(f"views: none written ({e})")
        return None


def run_experiment(cfg: ExperimentConfig, out: str | Path, resume: bool = False, estimate: bool = True) -> Path:
    """Run every stage of the experiment (skipping finished ones) and write the report; returns report.md.

    Args:
        cfg: the parsed config (:func:`load_experiment`).
        out: the output folder.
        resume: continue an experiment already in ``out`` (without it, a folder holding one is refused).
        estimate: time a few steps first so that the plan and the report show estimates beside actual times.
    """
    plan = make_plan(cfg, out)
    missing = plan.missing_weights()
    if missing:
        m, w = next(iter(missing.items()))
        raise D2maeError(f"weights file {w} of method {m} does not exist ({len(missing)} missing in all: "
                         f"{', '.join(missing)}); put the files there, fix weights: in {cfg.source}, or leave those "
                         "methods out")
    check_weights(plan)
    inputs: list[str | None] = [*cfg.weights.values()]
    for spec in cfg.datasets.values():
        inputs += [*labels_inputs(spec.labels, spec.path_column, spec.image_root, spec.image_ext), spec.folds_csv,
                   *(spec.pretrain_data or [])]
    claim_folder(plan.out, "experiment", inputs, resumable=True, forceable=False)
    with output_lock(plan.out, "experiment"):
        prepare_out(plan, resume)
        if estimate and any(s.done_info() is None for s in plan.stages):
            estimate_plan(plan)
        _say(format_plan(plan))
        started = time.perf_counter()
        for i, stage in enumerate(plan.stages, 1):
            run_stage(stage, plan, i, len(plan.stages))
        _say("writing the views and the report …")
        views = write_views(plan)
        path = write_report(plan, wall_seconds=time.perf_counter() - started, views=views)
    _say(f"report: {path}")
    return path

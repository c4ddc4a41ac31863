"""D²MAE pre-training (Section 2.2): blur each image at σ_t, t ~ U{1..T}, mask 75%, reconstruct the original.

One command runs every pre-training of the paper: D²MAE itself, the MAE, DeblurrMAE, MoCo v3 and DiffMAE rows of
Table 2 and the ablations of Table 3 (``--preset``; the objectives are :mod:`d2mae.method.objectives`)::

    d2mae pretrain --data images/ --out runs/pt                           # D²MAE, ViT-B, 224 px
    d2mae pretrain --data images/ --out runs/mae --preset mae             # MAE baseline (no blur)
    d2mae pretrain --data images/ --out runs/moco --preset moco-v3        # MoCo v3 (two views, momentum encoder)
    d2mae pretrain --data images/ --out runs/pt --resume                  # continue a stopped run
    torchrun --nproc_per_node 8 -m d2mae pretrain --data images/ --out runs/pt --batch-size 128   # 8 GPUs

Python: ``pretrain(PretrainConfig(data=["images/"], out="runs/pt"))`` returns the output folder.

The output folder is a pre-trained model folder (:func:`d2mae.io.artifacts.load_pretrained` reads it):

* ``model.safetensors`` + ``config.json``: the pre-training model (DeblurMAE, MoCoV3 or DiffMAE; its encoder is what
  fine-tuning loads), its blur schedule and the data set's mean/std (computed from the training images unless
  ``--mean``/``--std`` are given).
* ``pretrain.yaml``: the resolved run config (``d2mae pretrain --config pretrain.yaml`` repeats the run).
* ``metrics.jsonl``: one record per ``log_every_steps`` steps and at each epoch end: ``step`` (optimizer steps
  done), ``epoch`` (1-based), ``loss`` (mean over the steps since the last record), ``lr``, ``images_per_s``,
  ``time`` (training seconds so far, summed over resumed sessions).
* ``tensorboard/``: the same records as TensorBoard scalars (``pretrain/loss`` …) when the tensorboard package is
  installed (``--tensorboard auto``, the default; ``on`` requires it, ``off`` skips it).
* ``checkpoints/step<N>/`` (with ``--keep-steps N …``): the model after step N, each a pre-trained folder.
* ``init_report.json`` (with ``--init-from``): which tensors of the start checkpoint were loaded, converted or new.
* ``resume.pt``: ``format``/``format_version``, ``model``, ``optimizer``, ``scheduler`` (timm CosineLRScheduler
  state), ``scaler`` (None: bf16 needs none), ``epoch`` + ``micro_step`` (the next micro-batch to run), ``step``,
  ``elapsed``, ``rng`` (Python/NumPy/torch/CUDA states as tensors), ``sampler``, ``world_size``, ``config``,
  ``model_config``, ``data`` (image count and a hash of the list). Plain tensors and values only:
  ``torch.load(path, weights_only=True)``. Written atomically at epoch ends (``save_every_epochs``, at most every
  ``checkpoint_every_seconds``), every ``checkpoint_every_steps`` steps, at the end and on SIGTERM/SIGINT (exit
  status 143/130).

Reproducibility. Every random number of a step comes from a generator seeded by ``(seed, epoch, step)``: the
epoch's data order, each image's crop and flip (seeded by ``(seed, epoch, image)``, whatever loader worker decodes
it), and the objective's own draws (D²MAE: the blur levels t and the mask noise; MoCo v3: the views' photometric
augmentation; DiffMAE: the mask, the diffusion steps and each sample's noise seed). A run stopped at any point and resumed therefore ends with the same
weights as an uninterrupted run (bit for bit on a CPU), and W processes with batch B each match one process with
batch B·W up to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from d2mae.data.cache import DecodedCache
from d2mae.data.dataset import ImageDataset
from d2mae.data.decode import check_images, compute_stats, content_hashes
from d2mae.data.sampler import EpochBatchSampler, ShardShareSampler, rank_share
from d2mae.data.shards import open_shards
from d2mae.data.sources import find_images
from d2mae.io.artifacts import WEIGHTS, save_pretrained
from d2mae.io.imports import init_from_checkpoint
from d2mae.method.model_config import ModelConfig
from d2mae.method.objectives import build_objective
from d2mae.runtime import distributed as dist_utils
from d2mae.runtime.device import autocast, device_plan
from d2mae.runtime.distributed import DistContext
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint
from d2mae.runtime.locks import output_lock
from d2mae.runtime.logs import MetricsLog, say
from d2mae.runtime.options import save_config, to_dict
from d2mae.runtime.outputs import claim_folder
from d2mae.runtime.seeds import capture_rng_state, restore_rng_state, seed_everything
from d2mae.runtime.signals import StopSignals
from d2mae.runtime.threads import configure_threads
from d2mae.train.batches import LoaderBatches, MemoryBatches, choose_data_path, default_workers, step_randomness
from d2mae.train.interrupts import NonFiniteLossError, TrainingInterrupted
from d2mae.train.optim import build_optimizer, warmup_cosine_scheduler
from d2mae.train.pretrain_config import PretrainConfig
from d2mae.train.resume import check_resumable, check_same_images, resume_file, settings_diff

RESUME = "resume.pt"
CHECKPOINTS = "checkpoints"  # kept steps (keep_steps): checkpoints/step<N>/, each a pre-trained folder
HASHES = "pretrain_hashes.txt"  # sha256 and path of every pre-training image
METRICS = "metrics.jsonl"
RUN_CONFIG = "pretrain.yaml"
RESUME_FORMAT = "d2mae-pretrain-resume"
RESUME_VERSION = 1


# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------------------

def _refs_digest(refs: list[str]) -> str:
    return hashlib.sha256("\n".join(refs).encode("utf-8")).hexdigest()


def _check_resume_matches(state: dict[str, Any], cfg: PretrainConfig, refs_digest: str, num_images: int,
                          world_size: int, path: Path) -> None:
    if state.get("format") != RESUME_FORMAT or not isinstance(state.get("format_version"), int):
        raise D2maeError(f"{path} is not a d2mae pre-training resume checkpoint", option="resume")
    if state["format_version"] > RESUME_VERSION:
        raise D2maeError(f"{path} was written by a newer d2mae (resume format {state['format_version']})",
                         option="resume")
    # mean/std: computed from the data the first time, then taken from the checkpoint
    skip = [k for k in ("mean", "std") if getattr(cfg, k) is None]
    diffs = settings_diff(state.get("config", {}), cfg, skip=skip)
    if state.get("world_size") != world_size:
        diffs.append(f"processes: {state.get('world_size')} → {world_size}")
    data = state.get("data", {})
    if data.get("num_images") != num_images or data.get("refs_sha256") != refs_digest:
        diffs.append(f"images: {data.get('num_images')} → {num_images} (or other files)")
    check_resumable(path, diffs)


class Pretrainer:
    """One pre-training process (one rank): what :func:`pretrain` runs, usable step by step (benchmarks, notebooks).

    ``setup()`` checks the inputs and builds the model, optimizer, schedule and data path (or resumes them);
    ``train_step(epoch, batches, stop)`` runs one optimizer step; ``train()`` runs the epochs with logging,
    checkpoints and stop signals.
    """

    def __init__(self, cfg: PretrainConfig, ctx: DistContext, device: torch.device) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.device = device
        self.out = Path(cfg.out)
        self.metrics: MetricsLog | None = None  # rank 0 only

    # ---- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> bool:
        """Check the inputs, build everything; ``False`` when a resumed run had already finished."""
        cfg, ctx, out = self.cfg, self.ctx, self.out
        if out.exists() and not out.is_dir():
            raise D2maeError(f"{out} exists and is not a folder", option="out")

        def find_resume() -> Path | None:
            path = resume_file(cfg.resume, out, RESUME)
            if path is None and ((out / RESUME).exists() or (out / WEIGHTS).exists()):
                raise D2maeError(f"{out} already holds a pre-training run; continue it with resume, or choose a "
                                 "new output folder", option="out")
            return path

        resume_path = dist_utils.on_main(ctx, find_resume)
        if cfg.resume is not None and resume_path is None:
            say(ctx, f"no resume checkpoint in {out}; starting a new run")
        digest = self._setup_images(resume_path)
        state, model_cfg = self._setup_config(resume_path, digest)
        self._setup_model(state, model_cfg)
        if state is not None:
            self._restore(state, resume_path)
        if self.step >= self.total_steps:
            say(ctx, f"{out}: this run is already complete ({self.step} steps); nothing to do")
            return False
        self._setup_data(state)
        if ctx.is_main:
            self._prepare_out()
        return True

    def _setup_images(self, resume_path: Path | None) -> str:
        """The image list (checked, or a shard set's), its hashes for the leak guard, this rank's sampler and the
        step counts; returns the list's digest."""
        cfg, ctx, out = self.cfg, self.ctx, self.out
        def images() -> tuple[list[str], list[str] | None, int]:
            shards = open_shards(cfg.data)
            if shards is not None:  # checked when written (d2mae shards); every member's bytes checked here
                shards.verify(content_hashes(shards.refs))
                return shards.refs, shards.hashes, max(shards.shard_sizes)
            refs = find_images(cfg.data)
            return check_images(refs, in_chans=cfg.in_chans, skip_bad=cfg.skip_bad, out_dir=out,
                                min_size=cfg.patch_size), None, 0

        self.refs, hashes, shard_size = dist_utils.on_main(ctx, images)
        if ctx.is_main:  # for the data-leak guard of d2mae finetune; a resumed run must see the same images
            hashes = hashes or content_hashes(self.refs)
            if resume_path is None:
                atomic_write_text(out / HASHES, "".join(f"{h}  {r}\n" for h, r in zip(hashes, self.refs)))
            else:
                check_same_images(out / HASHES, self.refs, hashes)
        digest = _refs_digest(self.refs)
        self.sharded = bool(shard_size)
        if self.sharded:  # each process trains on its own contiguous share of the shards (d2mae.data.shards)
            share = rank_share(len(self.refs), ctx.rank, ctx.world_size)
            self.train_refs = self.refs[share]
            self.sampler: EpochBatchSampler = ShardShareSampler(
                len(self.train_refs), len(self.refs) // ctx.world_size, cfg.batch_size, cfg.seed, ctx.rank,
                steps_multiple=cfg.accum_iter, window=shard_size)
        else:
            self.train_refs = self.refs
            self.sampler = EpochBatchSampler(len(self.refs), cfg.batch_size, cfg.seed, ctx.rank, ctx.world_size,
                                             steps_multiple=cfg.accum_iter)
        self.micro_per_epoch = self.sampler.micro_steps
        self.steps_per_epoch = self.micro_per_epoch // cfg.accum_iter
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        beyond = [k for k in cfg.keep_steps or () if k > self.total_steps]
        if beyond:
            raise D2maeError(f"step(s) {', '.join(map(str, beyond))} lie beyond this run's last step "
                             f"({self.total_steps}: {cfg.epochs} epoch(s) of {self.steps_per_epoch} steps); keep "
                             "earlier steps or train longer", option="keep_steps")
        self.lr = cfg.resolved_lr(ctx.world_size)
        self.warmup_steps = min(self.total_steps, int(round(cfg.warmup_epochs * self.steps_per_epoch)))
        return digest

    def _setup_config(self, resume_path: Path | None, digest: str) -> tuple[dict[str, Any] | None, ModelConfig]:
        """The resume state (checked against this run) and the model config, with the data set's mean/std."""
        cfg, ctx = self.cfg, self.ctx
        state: dict[str, Any] | None = None
        if resume_path is not None:
            state = load_checkpoint(resume_path, given=resume_path != self.out / RESUME)
            _check_resume_matches(state, cfg, digest, len(self.refs), ctx.world_size, resume_path)
            model_cfg = ModelConfig.from_dict(state["model_config"], source=str(resume_path))
        else:
            model_cfg = cfg.model_config()
            if model_cfg.mean is None or model_cfg.std is None:
                mean, std = dist_utils.on_main(ctx, lambda: compute_stats(self.refs, cfg.in_chans, seed=cfg.seed))
                model_cfg = dataclasses.replace(model_cfg, mean=model_cfg.mean or mean, std=model_cfg.std or std)
        self.model_cfg = model_cfg
        # the config written beside the outputs: resolved, with the data set's statistics
        self.cfg = dataclasses.replace(cfg, mean=model_cfg.mean, std=model_cfg.std)
        return state, model_cfg

    def _setup_model(self, state: dict[str, Any] | None, model_cfg: ModelConfig) -> None:
        """The objective's model (initialised from ``init_from`` on a new run), AdamW and the lr schedule."""
        cfg, ctx = self.cfg, self.ctx
        seed_everything(cfg.seed)
        self.model = build_objective(model_cfg).to(self.device)  # DeblurMAE, MoCoV3 or DiffMAE
        if ctx.enabled and self.device.type == "cuda":  # MoCo v3's BatchNorms normalise over the global batch
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if state is None and cfg.init_from:
            self._init_from(cfg.init_from)
        self.optimizer = build_optimizer(self.model, cfg, self.lr)
        self.scheduler = warmup_cosine_scheduler(self.optimizer, self.total_steps, self.warmup_steps, cfg.min_lr)
        self.plan = device_plan(self.device, cfg.precision, model_cfg.embed_dim)
        self.amp = self.plan.amp
        self.epoch, self.micro, self.step, self.elapsed = 0, 0, 0, 0.0
        self.saved_step: int | None = None
        self.saved_at = time.perf_counter()  # epoch-end writes wait checkpoint_every_seconds after the last one

    def _restore(self, state: dict[str, Any], resume_path: Path) -> None:
        """Weights, optimizer, schedule, random generators and the position in the run, from a resume state."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        self.epoch, self.micro = int(state["epoch"]), int(state["micro_step"])
        self.step, self.elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
        self.saved_step = self.step
        say(self.ctx, f"resuming from {resume_path}: epoch {self.epoch + 1}, step {self.step}")

    def _setup_data(self, state: dict[str, Any] | None) -> None:
        """The data path (memory cache or DataLoader) and the model as trained (DDP, compiled)."""
        cfg, ctx = self.cfg, self.ctx
        self.data_path, self.data_why = choose_data_path(cfg, self.train_refs, self.device, ctx,
                                                         own_share=self.sharded)
        if state is not None and state.get("data_path_used") not in (None, self.data_path):
            say(ctx, f"note: the run so far cropped images with the {state['data_path_used']} data path, now with "
                      f"{self.data_path}; crops differ slightly from an uninterrupted run (data_path chooses)")
        if self.data_path == "memory":
            cache = DecodedCache(self.train_refs, cfg.img_size, cfg.in_chans,
                                 progress=cfg.progress and ctx.is_main and _tty())
            self.batches: Any = MemoryBatches(cache, self.sampler, self.device, views=self.model.views,
                                              scale=self.model.crop_scale)
        else:
            dataset = ImageDataset(self.train_refs, cfg.img_size, cfg.in_chans, augment="mae",
                                   views=self.model.views, crop_scale=self.model.crop_scale)
            workers = default_workers() if cfg.workers is None else cfg.workers
            self.batches = LoaderBatches(dataset, self.sampler, workers, pin=self.device.type == "cuda")

        self.train_model: torch.nn.Module = dist_utils.wrap_ddp(self.model, self.device, ctx)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)

    def _prepare_out(self) -> None:
        """Rank 0: the output folder, without half-written files of a killed run; the config; the metrics log."""
        cfg, ctx, out, model_cfg = self.cfg, self.ctx, self.out, self.model_cfg
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # half-written files of a killed run (atomic writes' temp files)
            if any(stale.name.startswith(f".{name}.") for name in (RESUME, WEIGHTS, METRICS, RUN_CONFIG,
                                                                    "config.json")):
                stale.unlink(missing_ok=True)
        save_config(self.cfg, out / RUN_CONFIG)
        self.metrics = MetricsLog(out / METRICS, "step", cfg.tensorboard, out / "tensorboard",
                                  resume_at=self.step, tag="pretrain")
        if self.warmup_steps >= self.total_steps and self.total_steps > 1:
            say(ctx, f"note: the warm-up ({cfg.warmup_epochs:g} epochs) is as long as the run; the lr never "
                     "reaches its peak (lower warmup_epochs)")
        say(ctx, f"pre-training {cfg.preset} ({cfg.arch}, {cfg.img_size} px, T = "
                 f"{model_cfg.schedule.num_levels}) on {len(self.refs)} images: {self.steps_per_epoch} steps/epoch "
                 f"× {cfg.epochs} epochs, effective batch {cfg.effective_batch(ctx.world_size)}, lr {self.lr:.3g}, "
                 f"{self.device}, {self.plan.precision} ({self.plan.why}), {ctx.world_size} process(es), data: "
                 f"{self.data_why}")


    def _init_from(self, path: str) -> None:
        """Load ImageNet MAE (or other) weights into the new model; every rank converts the same file."""

        if self.model_cfg.objective != "mae":
            raise D2maeError(f"starts a masked-autoencoder pre-training only (mae, deblurrmae, d2mae presets), not "
                             f"{self.model_cfg.objective}", option="init_from")

        report = init_from_checkpoint(self.model, path)
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "init_report.json", report.to_dict())
        say(self.ctx, report.summary())

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def resume_state(self) -> dict[str, Any]:
        epoch, micro = self.epoch, self.micro
        if micro >= self.micro_per_epoch:  # stopped right after an epoch's last step
            epoch, micro = epoch + 1, 0
        return {
            "format": RESUME_FORMAT, "format_version": RESUME_VERSION,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": None,
            "epoch": epoch, "micro_step": micro, "step": self.step, "elapsed": self.elapsed,
            "rng": capture_rng_state(),
            "sampler": {"seed": self.cfg.seed, "epoch": epoch, "start": micro,
                        "micro_steps_per_epoch": self.micro_per_epoch, "batch_size": self.cfg.batch_size,
                        "world_size": self.ctx.world_size},
            "world_size": self.ctx.world_size, "data_path_used": self.data_path,
            "config": to_dict(self.cfg), "model_config": self.model_cfg.to_dict(),
            "data": {"num_images": len(self.refs), "refs_sha256": _refs_digest(self.refs)},
        }

    def save_resume(self) -> Path:
        path = self.out / RESUME
        if self.ctx.is_main:
            save_checkpoint(self.resume_state(), path)
        self.saved_step = self.step
        self.saved_at = time.perf_counter()
        return path

    def save_model(self, folder: Path | None = None) -> None:
        """The pre-trained folder: ``out`` itself, or a kept step's ``out/checkpoints/step<N>``."""
        if self.ctx.is_main:
            images_seen = self.step * self.cfg.effective_batch(self.ctx.world_size)
            save_pretrained(self.model, folder or self.out, extra={
                "pretrain": {"preset": self.cfg.preset, "epoch": self.epoch, "step": self.step,
                             "images": len(self.refs), "images_seen": images_seen, "seed": self.cfg.seed,
                             "precision": {"used": self.plan.precision, "why": self.plan.why}}})

    def log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    # ---- training ---------------------------------------------------------------------------------------------
    def train_step(self, epoch: int, batches: Iterator[torch.Tensor], stop: StopSignals) -> tuple[float, bool]:
        """One optimizer step: ``accum_iter`` micro-batches forward/backward, then AdamW (Section 2.2, Eq. 3).

        Returns the step's loss (mean over micro-batches and ranks) and whether a stop signal reached any rank.
        """
        cfg, ctx = self.cfg, self.ctx
        accum = cfg.accum_iter
        self.scheduler.step_update(num_updates=self.step)  # warm-up + cosine, per step
        loss_sum = torch.zeros((), device=self.device)
        progress = self.model.progress_inputs(self.step / max(1, self.total_steps))  # MoCo v3: the momentum
        for k in range(accum):
            x = next(batches).to(self.device, non_blocking=True)  # [B, C, S, S] ([B, V, C, S, S]) in [0, 1]
            # the objective's randomness (D²MAE: t ~ U{1..T} [B], mask noise [B, N]), drawn from (seed, epoch,
            # micro-step): resumable and the same for any number of processes
            drawn = step_randomness(self.model, cfg.seed, epoch, self.micro + k, cfg.batch_size * ctx.world_size,
                                    ctx.rank, cfg.batch_size)
            drawn = {name: v.to(self.device, non_blocking=True) for name, v in drawn.items()}
            sync = k == accum - 1 or not ctx.enabled  # DDP: all-reduce gradients on the last micro-batch only
            with contextlib.nullcontext() if sync else self.train_model.no_sync():
                with autocast(self.device, self.amp):
                    loss, _, _ = self.train_model(x, **drawn, **progress)  # D²MAE: blur at σ_t, mask, reconstruct x
                (loss / accum).backward()
            loss_sum += loss.detach().float()
        flags = torch.stack([loss_sum / accum, (~torch.isfinite(loss_sum)).float(),
                             torch.tensor(float(stop.signum is not None), device=self.device)])
        flags = dist_utils.all_reduce_sum(flags, ctx).cpu()  # [loss, non-finite, stop]: one sync per step
        step_loss = float(flags[0]) / ctx.world_size
        if flags[1] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            kept = (f"the last good checkpoint {self.out / RESUME} (step {self.saved_step}) is kept"
                    if self.saved_step is not None else "no checkpoint had been written yet")
            advice = "lower the learning rate (blr)" + (" or use fp32 precision" if self.amp is not None else "")
            raise NonFiniteLossError(f"the loss became {step_loss} at step {self.step + 1} (epoch {epoch + 1}); "
                                     f"that step was not applied and {kept}; {advice}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.micro += accum
        self.step += 1
        return step_loss, bool(flags[2] > 0)

    def train(self) -> Path:
        """Epochs of :meth:`train_step`, with logging, checkpoints and the stop signals; returns the output folder."""
        cfg, ctx = self.cfg, self.ctx
        images_per_step = cfg.effective_batch(ctx.world_size)
        with StopSignals() as stop:
            while self.epoch < cfg.epochs and self.step < self.total_steps:
                epoch = self.epoch
                bar = _progress(ctx, cfg.progress, self.steps_per_epoch, self.micro // cfg.accum_iter, epoch,
                                cfg.epochs)
                epoch_loss, epoch_steps, epoch_time = 0.0, 0, 0.0
                log_loss, log_steps, log_start = 0.0, 0, time.perf_counter()
                batches = self.batches.epoch(epoch, self.micro)
                pending = False  # a step checkpoint that falls on the epoch's last step
                while self.micro < self.micro_per_epoch and self.step < self.total_steps:
                    t0 = time.perf_counter()
                    step_loss, stopping = self.train_step(epoch, batches, stop)
                    dt = time.perf_counter() - t0
                    self.elapsed += dt
                    epoch_loss, epoch_steps, epoch_time = epoch_loss + step_loss, epoch_steps + 1, epoch_time + dt
                    log_loss, log_steps = log_loss + step_loss, log_steps + 1
                    lr = self.optimizer.param_groups[0]["lr"]
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}",
                                        img_s=f"{epoch_steps * images_per_step / max(epoch_time, 1e-9):.1f}",
                                        refresh=False)
                    last_of_epoch = self.micro >= self.micro_per_epoch or self.step >= self.total_steps
                    if self.step % cfg.log_every_steps == 0 or last_of_epoch:
                        now = time.perf_counter()
                        self.log({"step": self.step, "epoch": epoch + 1, "loss": round(log_loss / log_steps, 6),
                                  "lr": lr, "images_per_s": round(log_steps * images_per_step / (now - log_start), 2),
                                  "time": round(self.elapsed, 3)})
                        log_loss, log_steps, log_start = 0.0, 0, time.perf_counter()
                    if stopping:
                        if bar is not None:
                            bar.close()
                        path = self.save_resume()
                        dist_utils.barrier(ctx)
                        raise TrainingInterrupted(int(stop.signum or signal.SIGTERM), self.step, path)
                    if self.step in (cfg.keep_steps or ()):
                        self.save_model(self.out / CHECKPOINTS / f"step{self.step}")
                    if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0:
                        if last_of_epoch:
                            pending = True
                        else:
                            self.save_resume()
                if bar is not None:
                    bar.close()
                if self.micro >= self.micro_per_epoch:
                    self.epoch, self.micro = epoch + 1, 0
                done = self.epoch >= cfg.epochs or self.step >= self.total_steps
                if not _tty():
                    say(ctx, f"epoch {epoch + 1}/{cfg.epochs}  step {self.step}  "
                             f"loss {epoch_loss / max(1, epoch_steps):.4f}  "
                             f"lr {self.optimizer.param_groups[0]['lr']:.3g}  "
                             f"{epoch_steps * images_per_step / max(epoch_time, 1e-9):.1f} img/s  {epoch_time:.1f} s")
                due = self.epoch % cfg.save_every_epochs == 0 and (
                    time.perf_counter() - self.saved_at >= cfg.checkpoint_every_seconds)
                if done or due:
                    self.save_model()
                    self.save_resume()
                elif pending:
                    self.save_resume()
        dist_utils.barrier(ctx)
        say(ctx, f"pre-trained model written to {self.out} ({self.step} steps)")
        return self.out


def _tty() -> bool:
    return sys.stderr.isatty()


def _progress(ctx: DistContext, show: bool, total: int, initial: int, epoch: int, epochs: int) -> Any:
    """A tqdm bar on a terminal (rank 0 only); ``None`` otherwise (one line per epoch is printed instead)."""
    if not (show and ctx.is_main and _tty()):
        return None

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step", dynamic_ncols=True,
                file=sys.stderr, leave=True)


def pretrain(cfg: PretrainConfig) -> Path:
    """Pre-train a DeblurMAE as ``cfg`` says and return the output folder (a pre-trained model folder).

    Under torchrun (``RANK``/``WORLD_SIZE`` set) each process trains on its shard with DistributedDataParallel and
    only rank 0 writes. Raises :class:`D2maeError` for bad input before training starts,
    :class:`NonFiniteLossError` when the loss diverges, :class:`TrainingInterrupted` after SIGTERM/SIGINT (a resume
    checkpoint has been written).
    """
    with dist_utils.distributed_run(cfg.device) as (ctx, device):
        dist_utils.on_main(ctx, lambda: claim_folder(cfg.out, "pretrain", [*cfg.data, cfg.init_from], resumable=True,
                                                     forceable=False))
        return _pretrain(cfg, ctx, device)


def _pretrain(cfg: PretrainConfig, ctx: DistContext, device: torch.device) -> Path:
    """:func:`pretrain` in its claimed output folder, holding its lock."""
    with output_lock(cfg.out, "pretrain", ctx):
        configure_threads(cfg.threads)
        run = Pretrainer(cfg, ctx, device)
        try:
            if not run.setup():
                return Path(cfg.out)
            return run.train()
        finally:
            if run.metrics is not None:
                run.metrics.close()

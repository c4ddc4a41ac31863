"""d2mae pre-training against a reference implementation written as typical MAE research code: one run, same machine.

Both sides train the same model (default: ``configs/busbra-cpu.yaml``'s, the CPU configuration a user gets: ViT-Tiny/16
+ a 2-block 128-wide decoder, 96 px, batch 64, memory data path) from the same initial
weights (the reference gets a copy of d2mae's), with the same AdamW, lr and schedule, on the same BUS-BRA images:

* reference (:mod:`reference_mae`): PIL decode → torchvision RandomResizedCrop(0.2-1) + flip → PIL GaussianBlur at a
  per-sample σ_t drawn in the worker → normalise, in ``--ref-workers`` DataLoader workers; MAE with the blur token,
  unfused attention, fp32.
* d2mae (:mod:`d2mae.train.pretrain`): the real pre-training step (``Pretrainer.train_step``) on the in-memory data path
  (:class:`d2mae.data.cache.DecodedCache` decoded once + batched crops), batched per-sample blur inside the model, timm
  blocks with fused SDPA attention.

Measurements alternate between the two sides in rounds (reference first in even rounds, d2mae first in odd ones),
each round ``--warm`` untimed steps then ``--steps`` timed steps per side, so that load from other jobs on the machine
hits both alike; the loader workers of the reference are started afresh each round and stopped after it, so they
never steal CPU from d2mae's round. Every step (warm-up included) is a training step, and the two loss curves are
reported side by side. A breakdown of each side's step (data, blur, forward, backward, optimizer; the reference's
per-image work in the workers; fused vs. unfused attention on the same model) follows.

    python benchmarks/speed_vs_reference.py                          # busbra-cpu.yaml: ViT-Tiny, 96 px, batch 64
    python benchmarks/speed_vs_reference.py --img-size 224 --batch-size 32 --decoder-embed-dim 512 \
        --decoder-depth 8 --decoder-num-heads 16 --steps 2 --warm 1 --breakdown-steps 2     # MAE's decoder, 224 px
    python benchmarks/speed_vs_reference.py --model vit_small_patch16 --n-images 256
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Iterator

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

import reference_mae as ref  # noqa: E402

from d2mae.data import decode as data_decode  # noqa: E402
from d2mae.data import sources as data_sources
from d2mae.method.blur import gaussian_blur
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.memory import keep_freed_memory

BUSBRA = REPO.parent / "shared" / "data" / "bus-bra" / "images"


# ---------------------------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    """``lscpu``'s model name (``/proc/cpuinfo`` or ``platform`` as fallbacks)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def machine_line() -> str:
    return (f"{cpu_model()}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} "
            f"intra-op threads), {platform.python_implementation()} {platform.python_version()}")


# ---------------------------------------------------------------------------------------------------------------
# d2mae side: the real pre-training run object, stepped from outside
# ---------------------------------------------------------------------------------------------------------------

class D2maeSide:
    """A :class:`d2mae.train.pretrain.Pretrainer` set up as ``d2mae pretrain`` would (memory data path), stepped one
    optimizer step at a time with its own ``train_step``."""

    def __init__(self, refs: list[str], args: argparse.Namespace, mean: list[float], std: list[float],
                 total_steps: int, out: Path, data_path: str = "memory") -> None:
        from d2mae.runtime.distributed import DistContext
        from d2mae.train.pretrain import Pretrainer
        from d2mae.train.pretrain_config import make_config

        steps_per_epoch = len(refs) // args.batch_size
        self.cfg = make_config(
            data=list(refs), out=str(out), arch=args.model, img_size=args.img_size, batch_size=args.batch_size,
            seed=args.seed, mean=mean, std=std, device="cpu", precision="fp32", data_path=data_path,
            epochs=max(1, -(-total_steps // max(1, steps_per_epoch))) + 1, max_steps=total_steps,
            warmup_epochs=args.warmup_steps / max(1, steps_per_epoch), blr=args.blr, lr=args.lr,
            checkpoint_every_steps=0, log_every_steps=10**6, num_workers=0, compile=getattr(args, "compile", False),
            tensorboard="off", **decoder_options(args))
        self.run = Pretrainer(self.cfg, DistContext(), torch.device("cpu"))
        with _quiet():
            if not self.run.setup():
                raise D2maeError("the d2mae run had nothing to do; lower --rounds/--steps or raise --n-images")
        self.stop = types.SimpleNamespace(signum=None)
        self.batches: Iterator[torch.Tensor] = self.run.batches.epoch(self.run.epoch, self.run.micro)
        self.losses: list[float] = []

    @property
    def model(self) -> torch.nn.Module:
        return self.run.model

    def step(self) -> float:
        run = self.run
        if run.micro >= run.micro_per_epoch:  # next epoch, as Pretrainer.train() does
            run.epoch, run.micro = run.epoch + 1, 0
            self.batches = run.batches.epoch(run.epoch, 0)
        loss, _ = run.train_step(run.epoch, self.batches, self.stop)
        self.losses.append(loss)
        return loss


class _quiet:
    """Swallow the run's start-up prints (stdout) while it sets up."""

    def __enter__(self) -> None:
        self._stdout = sys.stdout
        sys.stdout = open(os.devnull, "w")

    def __exit__(self, *exc: Any) -> None:
        sys.stdout.close()
        sys.stdout = self._stdout


def decoder_options(args: argparse.Namespace) -> dict[str, int]:
    return dict(decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
                decoder_num_heads=args.decoder_num_heads)


# ---------------------------------------------------------------------------------------------------------------
# reference side
# ---------------------------------------------------------------------------------------------------------------

class ReferenceSide:
    """The reference model, optimizer and loader; a fresh loader iterator (fresh workers) per round."""

    def __init__(self, refs: list[str], args: argparse.Namespace, model_cfg: Any, d2mae_state: dict, lr: float,
                 total_steps: int) -> None:
        self.model = ref.ReferenceDeblurMAE(ref.ReferenceConfig.from_d2mae(model_cfg)).train()
        ref.load_from_d2mae(self.model, d2mae_state)
        self.optimizer = ref.build_optimizer(self.model, lr, weight_decay=0.05)
        self.dataset = ref.BlurDataset(refs, model_cfg.img_size, model_cfg.schedule.sigmas[1:], model_cfg.mean,
                                       model_cfg.std, model_cfg.in_chans, blur_backend=args.blur_backend)
        self.loader = ref.make_loader(self.dataset, args.batch_size, args.ref_workers, args.seed)
        self.lr, self.total_steps, self.warmup_steps = lr, total_steps, args.warmup_steps
        self.mask_ratio = model_cfg.mask_ratio
        self.iterator: Iterator | None = None
        self.losses: list[float] = []

    def start_round(self) -> None:
        self.iterator = iter(self.loader)  # starts the workers

    def end_round(self) -> None:
        self.iterator = None  # stops the workers (non-persistent), so they don't compete with d2mae's round

    def next_batch(self) -> tuple:
        assert self.iterator is not None
        try:
            return next(self.iterator)
        except StopIteration:  # end of an epoch: a new one
            self.iterator = iter(self.loader)
            return next(self.iterator)

    def step(self) -> float:
        batch = self.next_batch()
        loss = ref.train_step(self.model, self.optimizer, batch, len(self.losses), self.lr, self.warmup_steps,
                              self.total_steps, torch.device("cpu"), self.mask_ratio)
        self.losses.append(loss)
        return loss


# ---------------------------------------------------------------------------------------------------------------
# checks: same model, same FLOPs
# ---------------------------------------------------------------------------------------------------------------

def same_model_check(d2: D2maeSide, rf: ReferenceSide, x: torch.Tensor, seed: int) -> tuple[float, float]:
    """Loss of both models on the same images, levels and mask (weights identical): the models are the same."""
    g = torch.Generator().manual_seed(seed)
    cfg = d2.run.model_cfg
    t = cfg.schedule.sample(x.shape[0], generator=g)  # [B]
    noise = torch.rand(x.shape[0], cfg.num_patches, generator=g)  # [B, N]
    enc = d2.model.encoder
    with torch.no_grad():
        l_d2, _, _ = d2.model(x, t, noise=noise)
        xb = enc.normalize(gaussian_blur(x, cfg.schedule.sigma(t)))  # what the reference's loader would produce
        l_rf, _, _ = rf.model(xb, enc.normalize(x), t, mask_ratio=cfg.mask_ratio, noise=noise)
    return float(l_d2), float(l_rf)


def step_flops(d2: D2maeSide, rf: ReferenceSide, x: torch.Tensor) -> dict[str, float]:
    """FLOPs of one forward + backward (torch.utils.flop_counter) of each model on batch ``x``."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = d2.run.model_cfg
    t = torch.ones(x.shape[0]) * cfg.schedule.num_levels
    out = {}
    # FlopCounterMode does not see the CPU SDPA kernel: count d2mae's attention as explicit matmuls (same math)
    fused = [m for m in d2.model.modules() if getattr(m, "fused_attn", None) is True]
    for m in fused:
        m.fused_attn = False
    try:
        with FlopCounterMode(display=False) as fc:
            loss, _, _ = d2.model(x, t)
            loss.backward()
    finally:
        for m in fused:
            m.fused_attn = True
    out["d2mae"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        gaussian_blur(x, cfg.schedule.sigma(t))
    out["d2mae_blur"] = fc.get_total_flops()
    enc = d2.model.encoder
    with FlopCounterMode(display=False) as fc:
        loss, _, _ = rf.model(enc.normalize(x), enc.normalize(x), t, mask_ratio=cfg.mask_ratio)
        loss.backward()
    out["reference"] = fc.get_total_flops()
    d2.model.zero_grad(set_to_none=True)
    rf.model.zero_grad(set_to_none=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# breakdown
# ---------------------------------------------------------------------------------------------------------------

def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def d2mae_breakdown(d2: D2maeSide, steps: int) -> dict[str, float]:
    """Seconds per step of d2mae's phases (same model/optimizer/batches as train_step, timed piece by piece)."""
    from d2mae.train.batches import step_randomness

    run = d2.run
    cfg = run.model_cfg
    times: dict[str, list[float]] = {k: [] for k in ("data", "blur", "forward", "backward", "optimizer")}
    it = run.batches.epoch(run.epoch + 1000, 0)  # an unused epoch: fresh permutation and crops
    for k in range(steps):
        t0 = time.perf_counter()
        x = next(it)  # [B, C, S, S] cropped from the decoded cache
        t1 = time.perf_counter()
        drawn = step_randomness(run.model, d2.cfg.seed, 10**6, k, x.shape[0], 0, x.shape[0])
        t, noise = drawn["t"], drawn["noise"]
        with torch.no_grad():
            gaussian_blur(x, cfg.schedule.sigma(t))
        t2 = time.perf_counter()
        loss, _, _ = run.model(x, t, noise=noise)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        blur = t2 - t1
        for name, v in zip(times, (t1 - t0, blur, max(0.0, t3 - t2 - blur), t4 - t3, t5 - t4)):
            times[name].append(v)
    return {k: _mean(v) for k, v in times.items()}


def reference_breakdown(rf: ReferenceSide, steps: int) -> dict[str, float]:
    """Seconds per step of the reference's phases in the main process (``data`` = waiting for the workers)."""
    times: dict[str, list[float]] = {k: [] for k in ("data", "forward", "backward", "optimizer")}
    rf.start_round()
    rf.next_batch()  # workers up
    for _ in range(steps):
        t0 = time.perf_counter()
        xb, x, t = rf.next_batch()
        t1 = time.perf_counter()
        loss, _, _ = rf.model(xb, x, t, mask_ratio=rf.mask_ratio)
        loss.item()
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        rf.optimizer.step()
        rf.optimizer.zero_grad()
        t4 = time.perf_counter()
        for name, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[name].append(v)
    rf.end_round()
    return {k: _mean(v) for k, v in times.items()}


def worker_costs(rf: ReferenceSide, n: int) -> dict[str, float]:
    """CPU seconds per image of the reference's per-sample data work (what its workers do), timed in this process
    with one torch thread, as a DataLoader worker has."""
    import random

    from PIL import Image

    ds = rf.dataset
    parts: dict[str, list[float]] = {k: [] for k in ("decode", "crop_flip", "blur", "to_tensor_normalize")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    for i in range(min(n, len(ds))):
        t0 = time.perf_counter()
        with Image.open(ds.paths[i]) as f:
            img = f.convert(ds.mode)
        t1 = time.perf_counter()
        img = ds.crop(img)
        t2 = time.perf_counter()
        blurred = ds.blur(img, ds.sigmas[random.randrange(len(ds.sigmas))])
        t3 = time.perf_counter()
        ds.to_tensor(blurred), ds.to_tensor(img)
        t4 = time.perf_counter()
        for name, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[name].append(v)
    torch.set_num_threads(threads)
    return {k: _mean(v) for k, v in parts.items()}


def attention_effect(rf: ReferenceSide, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Forward + backward seconds of the reference model with unfused vs. fused (SDPA) attention, same input."""
    from timm.models.vision_transformer import Attention

    attn = [m for m in rf.model.modules() if isinstance(m, Attention)]
    t = torch.ones(x.shape[0])
    out: dict[str, float] = {}
    order = ["unfused", "fused"] * repeats
    times: dict[str, list[float]] = {"unfused": [], "fused": []}
    for mode in order:
        for m in attn:
            m.fused_attn = mode == "fused"
        g = torch.Generator().manual_seed(0)
        noise = torch.rand(x.shape[0], rf.model.patch_embed.num_patches, generator=g)
        t0 = time.perf_counter()
        loss, _, _ = rf.model(x, x, t, mask_ratio=rf.mask_ratio, noise=noise)
        loss.backward()
        times[mode].append(time.perf_counter() - t0)
        rf.model.zero_grad(set_to_none=True)
    for m in attn:
        m.fused_attn = False
    for mode, v in times.items():
        out[mode] = min(v)
    return out


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(BUSBRA), help="image folder (default: BUS-BRA beside the repository)")
    ap.add_argument("--n-images", type=int, default=None, help="use the first N images (default: all)")
    ap.add_argument("--model", default="vit_tiny_patch16")
    ap.add_argument("--img-size", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--decoder-embed-dim", type=int, default=128)
    ap.add_argument("--decoder-depth", type=int, default=2)
    ap.add_argument("--decoder-num-heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    ap.add_argument("--warm", type=int, default=2, help="untimed steps per side at the start of each round")
    ap.add_argument("--breakdown-steps", type=int, default=10, help="steps per side of the phase breakdown (0: none)")
    ap.add_argument("--ref-workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="the reference's DataLoader workers (default: CPU cores, at most 8)")
    ap.add_argument("--ref-threads", type=int, default=None,
                    help="the reference's torch threads in its rounds (default: --threads); with W loader workers on "
                         "C cores, C - W leaves no core oversubscribed")
    ap.add_argument("--blur-backend", default="pil", choices=ref.BLUR_BACKENDS)
    ap.add_argument("--blr", type=float, default=1.5e-4, help="base lr, lr = blr × batch / 256 (MAE)")
    ap.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    ap.add_argument("--warmup-steps", type=int, default=0, help="linear lr warm-up steps (both sides)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--compile", action="store_true",
                    help="d2mae side with torch.compile (d2mae pretrain --compile); its first warm step compiles")
    ap.add_argument("--allocator", default="kept", choices=["kept", "default"],
                    help="kept: freed memory stays in the process, as the d2mae command line sets it "
                         "(d2mae.runtime.memory; both sides share the process, so the reference gets it too); "
                         "default: glibc's own rules for both")
    ap.add_argument("--json-out", default=None, help="also write every number to this JSON file")
    args = ap.parse_args(argv)
    for name in ("rounds", "steps", "batch_size", "img_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.warm < 0 or args.breakdown_steps < 0 or args.ref_workers < 0:
        ap.error("--warm, --breakdown-steps and --ref-workers must be ≥ 0")
    return args


def images_per_second(step: Any, args: argparse.Namespace) -> float:
    """``args.warm`` untimed then ``args.steps`` timed training steps of one side; its rate in images/s."""
    for _ in range(args.warm):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.allocator == "kept" and not keep_freed_memory():
        print("# NOTE: freed memory could not be kept (not glibc, or MALLOC_* set): glibc's defaults")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = loadavg()
    started = time.perf_counter()
    print("# d2mae vs reference MAE code: pre-training speed, same machine, same run")
    print(f"# date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"# machine: {machine_line()}")
    print(f"# NOTE: the machine is shared with other jobs; load average before: {load_before} (1/5/15 min)")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")

    refs = data_sources.find_images([args.data])
    if args.n_images:
        refs = refs[:args.n_images]
    per_round = args.warm + args.steps
    total_steps = args.rounds * per_round
    if len(refs) < args.batch_size:
        raise D2maeError(f"{len(refs)} images are fewer than one batch ({args.batch_size}); lower --batch-size")
    mean, std = data_decode.compute_stats(refs, max_images=256, seed=args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        d2 = D2maeSide(refs, args, mean, std, total_steps, Path(tmp) / "run")
        setup_s = time.perf_counter() - t0
        model_cfg = d2.run.model_cfg
        rf = ReferenceSide(refs, args, model_cfg, d2.model.state_dict(), d2.run.lr, total_steps)
        print(f"# model {args.model} {args.img_size} px, decoder {args.decoder_embed_dim}x{args.decoder_depth}, "
              f"batch {args.batch_size}, {len(refs)} images from {args.data}, seed {args.seed}, lr {d2.run.lr:.3g} "
              f"(warm-up {args.warmup_steps} steps, cosine over {total_steps}), T = {model_cfg.schedule.num_levels}")
        print(f"# reference: {args.ref_workers} DataLoader workers, {args.ref_threads or torch.get_num_threads()} "
              f"torch threads, {args.blur_backend} blur per image, unfused "
              f"attention, fp32; d2mae: {d2.run.data_path} data path, batched blur in the model, fused SDPA, fp32")
        print(f"# d2mae one-off setup (check images + decode cache of {len(refs)} images + model): {setup_s:.1f} s")

        probe = next(d2.run.batches.epoch(10**6, 0))  # [B, C, S, S] a batch that training never sees
        l_d2, l_rf = same_model_check(d2, rf, probe, args.seed)
        flops = step_flops(d2, rf, probe)
        print(f"# same weights, same batch/t/mask: loss d2mae {l_d2:.6f} vs reference {l_rf:.6f} "
              f"(|Δ| {abs(l_d2 - l_rf):.2e})")
        print(f"# FLOPs per step (forward + backward, batch {args.batch_size}): d2mae {flops['d2mae'] / 1e9:.1f} G "
              f"(of which the blur {flops['d2mae_blur'] / 1e9:.2f} G; attention counted as its matmuls), reference model "
              f"{flops['reference'] / 1e9:.1f} G (its blur runs in PIL, not counted)")

        rounds: list[dict[str, float]] = []
        print("\n| round | order | reference img/s | d2mae img/s | ratio | load (1 min) |")
        print("|---:|---|---:|---:|---:|---:|")
        for r in range(args.rounds):
            order = ("reference", "d2mae") if r % 2 == 0 else ("d2mae", "reference")
            rates: dict[str, float] = {}
            for side in order:
                if side == "reference":
                    own = torch.get_num_threads()
                    torch.set_num_threads(args.ref_threads or own)
                    rf.start_round()  # fresh loader workers for this round only
                    rates[side] = images_per_second(rf.step, args)
                    rf.end_round()
                    torch.set_num_threads(own)
                else:
                    rates[side] = images_per_second(d2.step, args)
            rates["ratio"] = rates["d2mae"] / rates["reference"]
            rates["load1"] = os.getloadavg()[0]
            rounds.append(rates)
            print(f"| {r + 1} | {' → '.join(order)} | {rates['reference']:.1f} | {rates['d2mae']:.1f} | "
                  f"{rates['ratio']:.2f}× | {rates['load1']:.2f} |", flush=True)

        # images/s over all timed steps: harmonic combination of equal-size rounds
        def overall(side: str) -> float:
            return len(rounds) / sum(1.0 / r[side] for r in rounds)

        ref_rate, d2_rate = overall("reference"), overall("d2mae")
        ratios = [r["ratio"] for r in rounds]
        print(f"\n**reference {ref_rate:.1f} img/s, d2mae {d2_rate:.1f} img/s: d2mae is {d2_rate / ref_rate:.2f}× "
              f"the reference** (per-round ratios {min(ratios):.2f}-{max(ratios):.2f}, median "
              f"{statistics.median(ratios):.2f}×; {args.rounds} rounds × {args.steps} timed steps per side)")

        k = min(5, len(d2.losses))
        print(f"\nloss curves, same seed and initial weights, {total_steps} steps each (warm-up steps included):")
        print("| | first | mean first {k} | mean last {k} | last |".format(k=k))
        print("|---|---:|---:|---:|---:|")
        for name, losses in (("reference", rf.losses), ("d2mae", d2.losses)):
            print(f"| {name} | {losses[0]:.4f} | {_mean(losses[:k]):.4f} | {_mean(losses[-k:]):.4f} | "
                  f"{losses[-1]:.4f} |")
        print("per step (reference / d2mae): " + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(rf.losses, d2.losses)))

        result: dict[str, Any] = {
            "args": vars(args), "machine": machine_line(), "load_before": load_before,
            "images": len(refs), "d2mae_setup_s": setup_s, "same_model_loss": [l_d2, l_rf], "flops": flops,
            "rounds": rounds, "reference_img_s": ref_rate, "d2mae_img_s": d2_rate, "ratio": d2_rate / ref_rate,
            "loss_reference": rf.losses, "loss_d2mae": d2.losses,
        }

        if args.breakdown_steps:
            print(f"\nstep breakdown ({args.breakdown_steps} steps per side, seconds per step of batch "
                  f"{args.batch_size}):")
            bd_ref = reference_breakdown(rf, args.breakdown_steps)
            bd_d2 = d2mae_breakdown(d2, args.breakdown_steps)
            wk = worker_costs(rf, 2 * args.batch_size)
            att = attention_effect(rf, probe, repeats=2)
            phases = ("data", "blur", "forward", "backward", "optimizer")
            print("| side | " + " | ".join(phases) + " | total |")
            print("|---|" + "---:|" * (len(phases) + 1))
            for name, bd in (("reference (main process)", bd_ref), ("d2mae", bd_d2)):
                cells = [f"{bd[p]:.3f}" if p in bd else "(in workers)" for p in phases]
                print(f"| {name} | " + " | ".join(cells) + f" | {sum(bd.values()):.3f} |")
            per_batch = {k: v * args.batch_size for k, v in wk.items()}
            print(f"reference worker CPU per batch of {args.batch_size} (single process, s): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in per_batch.items())
                  + f"; total {sum(per_batch.values()):.3f} s of CPU per step, spread over {args.ref_workers} workers "
                  "that share the cores with the model")
            print(f"reference model forward + backward on one batch: unfused attention {att['unfused']:.3f} s, "
                  f"fused SDPA {att['fused']:.3f} s ({att['unfused'] / att['fused']:.2f}×)")
            result.update(breakdown_reference=bd_ref, breakdown_d2mae=bd_d2, worker_s_per_image=wk,
                          attention=att)

    load_after = loadavg()
    print(f"\n# load average after: {load_after} (before: {load_before}); wall time "
          f"{time.perf_counter() - started:.0f} s")
    result["load_after"] = load_after
    if args.json_out:
        from d2mae.runtime.files import atomic_write_json
        atomic_write_json(args.json_out, result)
    return result


if __name__ == "__main__":
    try:
        main()
    except D2maeError as exc:
        print(f"speed_vs_reference: {exc}", file=sys.stderr)
        sys.exit(2)

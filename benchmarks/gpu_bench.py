"""One short GPU benchmark of D²MAE pre-training and OBS (run by benchmarks/gpu.sh; under 8 minutes on one H100).

For each batch size (and eager and/or ``torch.compile``) it times real pre-training steps of a ViT-B/16 DeblurMAE
(MAE decoder 512 × 8, 224 px, bf16 autocast, fused AdamW — what ``d2mae pretrain`` does on a GPU) on the in-memory
data path: synthetic uint8 ultrasound-like images (speckle on a smooth background; no data set exists on the GPU
machine) of a BUS-BRA-like native size (``NATIVE`` × the input size) held on the GPU, cropped per batch with
:func:`d2mae.data.resample.crop_resize` (the memory cache's antialiased bicubic crops), blurred per sample inside the
model. It reports

* images/s and ms per step (after ``--warmup`` untimed steps; the first compiled step's time is reported apart);
* model FLOP utilisation: FLOPs of one training step (forward + backward, counted once with
  ``torch.utils.flop_counter.FlopCounterMode`` on the eager model, attention counted as its two matrix products,
  the batched blur's matrix products included),
  achieved TFLOP/s, and that over the dense bf16 peak (``--peak-tflops``; defaults in ``BF16_DENSE_TFLOPS``);
* peak GPU memory (``torch.cuda.max_memory_allocated``);
* OBS images/s: :meth:`d2mae.method.models.DeblurMAE.deblur_loss` on a batch of images × the 6 searched levels
  (t = 1, 3, …, 11; search step 2) in one pass, as :func:`d2mae.method.obs.search_losses` does;
* the wall time the paper's thyroid schedule (10,675 images × 8,000 epochs) would take on one such GPU.

Writes ``gpu_bench.md`` (Markdown table) and ``gpu_bench.json`` to ``--out`` (default ``$OUT``, else
``benchmarks/gpu_results``), rewritten after each configuration so that a run cut short keeps what it measured.

    PYTHONPATH=src python benchmarks/gpu_bench.py --device cuda --batch-sizes 64 256 --compile-modes eager compiled
    PYTHONPATH=src python benchmarks/gpu_bench.py --device cpu --tiny          # a seconds-long check of the script
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

# Dense bf16 peaks for the utilisation. H100 SXM: NVIDIA's data sheet (1979 is with 2:4 sparsity). H200: the
# ~790 TFLOP/s that this project's GPU target (issue 14: ≥ 40% MFU) is stated against; NVIDIA's data sheet gives
# 989 for the SXM part (pass --peak-tflops 989 for that).
BF16_DENSE_TFLOPS = {"H200": 790.0, "H100": 989.0}
THYROID_IMAGES = 10_675  # the paper's thyroid pre-training set
THYROID_EPOCHS = 8_000
NATIVE = 1.8  # stored image side / model input side: BUS-BRA's ~400 px images for a 224 px model
TINY = dict(arch="vit_tiny_patch16", img_size=32, depth=2, embed_dim=64, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2)


def check_environment() -> None:
    """Clear messages for what the GPU machine may lack (it has torch; timm and the rest are d2mae's deps)."""
    missing = []
    for module, pip_name in (("torch", "torch"), ("timm", "timm"), ("torchvision", "torchvision"),
                             ("yaml", "PyYAML"), ("safetensors", "safetensors"), ("numpy", "numpy")):
        try:
            __import__(module)
        except ImportError:
            missing.append(pip_name)
    if missing:
        print(f"gpu_bench: missing Python package(s) {', '.join(missing)} (d2mae needs them): "
              f"pip install {' '.join(missing)} (or carry wheels to an offline machine)", file=sys.stderr)
        sys.exit(3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and 32 px images (a quick CPU check)")
    ap.add_argument("--model", default="vit_base_patch16")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--compile-modes", nargs="+", default=["eager"], choices=["eager", "compiled"])
    ap.add_argument("--compile", action="store_true", help="shorthand for --compile-modes eager compiled")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "auto"])
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense peak of the device for the utilisation (default for bf16: "
                         + ", ".join(f"{k} {v:g}" for k, v in BF16_DENSE_TFLOPS.items()) + "; else none)")
    ap.add_argument("--cache-images", type=int, default=1024, help="synthetic images held on the device")
    ap.add_argument("--obs-batch", type=int, default=64, help="images per OBS pass (× 6 levels)")
    ap.add_argument("--obs-repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=THYROID_IMAGES, help="data set size for the schedule estimate")
    ap.add_argument("--epochs", type=int, default=THYROID_EPOCHS, help="epochs for the schedule estimate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for gpu_bench.md/.json (default: $OUT, else "
                                                "benchmarks/gpu_results)")
    args = ap.parse_args(argv)
    if args.compile and "compiled" not in args.compile_modes:
        args.compile_modes = list(args.compile_modes) + ["compiled"]
    if args.tiny:
        args.img_size = TINY["img_size"]
        if args.batch_sizes == [64, 256]:
            args.batch_sizes = [8]
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        args.cache_images, args.obs_batch, args.obs_repeats = min(args.cache_images, 32), min(args.obs_batch, 4), 1
    for name in ("steps", "cache_images", "obs_batch", "obs_repeats", "images", "epochs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.warmup < 0 or min(args.batch_sizes) < 1:
        ap.error("--warmup must be ≥ 0 and every batch size ≥ 1")
    return args


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(TINY) if args.tiny else dict(arch=args.model, img_size=args.img_size)


def synthetic_images(n: int, side: int, device: Any, seed: int) -> Any:
    """uint8 [n, 1, side, side] ultrasound-like images on ``device``: Rayleigh speckle on smooth blobs."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    out = torch.empty(n, 1, side, side, dtype=torch.uint8)
    for start in range(0, n, 64):
        b = min(64, n - start)
        cx, cy, r = (torch.rand(3, b, 1, 1, generator=g) * torch.tensor([1.2, 1.2, 0.5]).view(3, 1, 1, 1)
                     + torch.tensor([-0.6, -0.6, 0.15]).view(3, 1, 1, 1))
        lesion = ((xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2).float()  # [b, side, side]
        base = 0.45 + 0.2 * torch.cos(3 * yy) - 0.3 * lesion
        speckle = torch.sqrt(torch.randn(b, side, side, generator=g) ** 2 + torch.randn(b, side, side, generator=g) ** 2)
        img = (base * speckle / 1.25).clamp(0, 1)
        out[start:start + b, 0] = (img * 255).round().to(torch.uint8)
    return out.to(device)


def crop_batch(images: Any, idx: Any, size: int, generator: Any | None) -> Any:
    """The memory path's crops of ``images[idx]``: RandomResizedCrop + flip (``generator``), or the deterministic
    centre view (``None``), resampled on the device -> float32 [B, 1, S, S]."""
    import torch

    from d2mae.data.cache import center_fractions, crop_boxes
    from d2mae.data.dataset import CROP_RATIO, CROP_SCALE
    from d2mae.data.resample import crop_resize

    batch = images[idx]  # [B, 1, H, W] uint8, square synthetic images
    b, side = batch.shape[0], batch.shape[-1]
    aspect = torch.ones(b)
    if generator is None:
        (cx, cy, w, h), flip = center_fractions(aspect), None
    else:
        (cx, cy, w, h), flip = crop_boxes(aspect, CROP_SCALE, CROP_RATIO, generator), torch.rand(b, generator=generator) < 0.5
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).double() * side  # [B, 4] pixels
    return crop_resize(batch, torch.full((b, 2), side), boxes, size, flip)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_config(args: argparse.Namespace, batch: int) -> Any:
    """A :class:`d2mae.train.pretrain_config.PretrainConfig` as ``d2mae pretrain`` would build it (data unused here)."""
    from d2mae.train.pretrain_config import make_config

    return make_config(data=["synthetic"], out="unused", batch_size=batch, mean=[0.45], std=[0.25],
                       precision=args.precision, seed=args.seed, **model_options(args))


def measure_training(args: argparse.Namespace, device: Any, batch: int, mode: str, images: Any,
                     flops_cache: dict[int, float]) -> dict[str, Any]:
    """Time pre-training steps of one (batch size, eager/compiled) configuration."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from d2mae.method.models import DeblurMAE
    from d2mae.runtime.device import amp_dtype, autocast
    from d2mae.train.batches import step_randomness
    from d2mae.train.optim import build_optimizer, warmup_cosine_scheduler

    cfg = train_config(args, batch)
    model_cfg = cfg.model_config()
    torch.manual_seed(args.seed)
    model = DeblurMAE(model_cfg).to(device).train()
    optimizer = build_optimizer(model, cfg, cfg.resolved_lr())
    total = args.warmup + args.steps
    scheduler = warmup_cosine_scheduler(optimizer, total, 0, 0.0)
    amp = amp_dtype(device, cfg.precision)
    gen = torch.Generator().manual_seed(args.seed)

    def batch_at(step: int) -> tuple[Any, Any, Any]:
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x = crop_batch(images, idx.to(device), cfg.img_size, gen)  # [B, 1, S, S]
        drawn = step_randomness(model, args.seed, 0, step, batch, 0, batch)  # t [B], mask noise [B, N]
        return x, drawn["t"].to(device), drawn["noise"].to(device)

    if batch not in flops_cache:  # FLOPs of one step (forward + backward), eager, counted once per batch size
        x, t, noise = batch_at(0)
        # attention counted as its two matrix products: the counter may not know every fused SDPA kernel
        fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
        for m in fused:
            m.fused_attn = False
        try:
            with FlopCounterMode(display=False) as counter:
                with autocast(device, amp):
                    loss, _, _ = model(x, t, noise=noise)
                loss.backward()
        finally:
            for m in fused:
                m.fused_attn = True
        optimizer.zero_grad(set_to_none=True)
        flops_cache[batch] = float(counter.get_total_flops())
    flops = flops_cache[batch]

    train_model = torch.compile(model) if mode == "compiled" else model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step(k: int) -> float:
        scheduler.step_update(num_updates=k)
        x, t, noise = batch_at(k)
        with autocast(device, amp):
            loss, _, _ = train_model(x, t, noise=noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())  # one host sync per step, as pre-training's logging does

    sync(device)
    t0 = time.perf_counter()
    first_loss = step(0)
    sync(device)
    first_step_s = time.perf_counter() - t0
    for k in range(1, args.warmup):
        step(k)
    sync(device)
    t0 = time.perf_counter()
    for k in range(max(1, args.warmup), max(1, args.warmup) + args.steps):
        last_loss = step(k)
    sync(device)
    elapsed = time.perf_counter() - t0
    step_s = elapsed / args.steps
    result = {
        "model": model_cfg.arch + (" (tiny test)" if args.tiny else ""), "img_size": model_cfg.img_size,
        "batch": batch, "mode": mode,
        "precision": "bf16" if amp is not None else "fp32", "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "images_per_s": batch / step_s, "step_ms": 1000 * step_s, "first_step_s": first_step_s,
        "gflop_per_step": flops / 1e9, "achieved_tflops": flops / step_s / 1e12,
        "loss_first": first_loss, "loss_last": last_loss,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    del train_model, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def measure_loss_gap(args: argparse.Namespace, device: Any, images: Any) -> dict[str, float]:
    """The pre-training loss of one fixed batch in fp32 and in bf16 autocast, same weights and randomness: how far
    the GPU's precision moves the objective (tests/test_gpu_path.py holds the CPU's gap under 2%)."""
    import torch

    from d2mae.method.models import DeblurMAE
    from d2mae.train.batches import step_randomness

    cfg = train_config(args, min(args.batch_sizes))
    torch.manual_seed(args.seed)
    model = DeblurMAE(cfg.model_config()).to(device).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
    x = crop_batch(images, idx.to(device), cfg.img_size, gen)
    drawn = {k: v.to(device) for k, v in step_randomness(model, args.seed, 0, 0, cfg.batch_size, 0,
                                                         cfg.batch_size).items()}
    with torch.no_grad():
        fp32 = float(model(x, **drawn)[0])
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = float(model(x, **drawn)[0])
    return {"fp32": fp32, "bf16": bf16, "relative_gap": abs(bf16 - fp32) / max(abs(fp32), 1e-12)}


def measure_obs(args: argparse.Namespace, device: Any, images: Any) -> dict[str, Any]:
    """OBS throughput: images × 6 searched levels through deblur_loss in one batched pass (Eqs. 4-5)."""
    import torch

    from d2mae.method.models import DeblurMAE
    from d2mae.runtime.device import amp_dtype, autocast

    cfg = train_config(args, args.obs_batch).model_config()
    torch.manual_seed(args.seed)
    model = DeblurMAE(cfg).to(device).eval()
    amp = amp_dtype(device, args.precision)
    levels = cfg.schedule.search_levels(2)  # t = 1, 3, 5, 7, 9, 11
    b = args.obs_batch
    x = crop_batch(images, torch.arange(b, device=images.device), cfg.img_size, None)  # [B, 1, S, S]
    xr = x.unsqueeze(1).expand(b, len(levels), *x.shape[1:]).reshape(b * len(levels), *x.shape[1:])  # [B·L, ...]
    tr = torch.tensor(levels, dtype=torch.float32, device=device).repeat(b)  # [B·L]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one() -> Any:
        with torch.no_grad(), autocast(device, amp):
            return model.deblur_loss(xr, tr).float().view(b, len(levels)).argmin(1)  # t* index per image

    one()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.obs_repeats):
        one()
    sync(device)
    dt = (time.perf_counter() - t0) / args.obs_repeats
    return {"batch": b, "levels": len(levels), "images_per_s": b / dt, "pass_ms": 1000 * dt,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def human_time(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def write_report(out: Path, header: dict[str, Any], rows: list[dict[str, Any]], obs: dict[str, Any] | None,
                 peak: float | None, args: argparse.Namespace, gap: dict[str, float] | None = None) -> Path:
    from d2mae.runtime.files import atomic_write_json, atomic_write_text

    lines = [f"# GPU benchmark: D²MAE pre-training and OBS on {header['device_name']}", "",
             f"- date {header['date']}; torch {header['torch']}, timm {header['timm']}, CUDA {header['cuda']}; "
             f"command `{header['command']}`",
             f"- data: {header['cache_images']} synthetic uint8 speckle images on the device (in-memory data path, "
             "batched RandomResizedCrop + flip, per-sample blur in the model)",
             f"- peak used for utilisation: {f'{peak:g} TFLOP/s (dense bf16)' if peak else 'none given'}; "
             "FLOPs counted with torch.utils.flop_counter on one eager step (forward + backward; attention as its two "
             "matrix products; the blur's matrix products included)",
             f"- schedule estimate: {args.images:,} images × {args.epochs:,} epochs "
             f"(the paper's thyroid pre-training) at the measured rate", "",
             "| model | px | batch | precision | mode | img/s | ms/step | GFLOP/step | TFLOP/s | MFU | peak GiB "
             "| first step s | thyroid schedule |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = f"{100 * r['achieved_tflops'] / peak:.1f}%" if peak else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(f"| {r['model']} | {r['img_size']} | {r['batch']} | {r['precision']} | {r['mode']} | "
                     f"{r['images_per_s']:.0f} | {r['step_ms']:.1f} | {r['gflop_per_step']:.4g} | "
                     f"{r['achieved_tflops']:.3g} | {mfu} | {mem} | {r['first_step_s']:.1f} | "
                     f"{human_time(args.images * args.epochs / r['images_per_s'])} |")
    if rows:
        per_image = rows[0]["gflop_per_step"] * 1e9 / rows[0]["batch"]
        lines += ["", f"Anchors: about 2,000 img/s per A100 for MAE ViT-B (DailyMAE: 800 epochs of ImageNet in 18 h on 8 "
                      f"A100); 40% MFU of an H100's 989 dense bf16 TFLOP/s would be "
                      f"{0.4 * 989e12 / per_image:,.0f} img/s at this step's {per_image / 1e9:.3g} GFLOP per image."]
    if gap is not None:
        lines += ["", f"bf16 against fp32 on one fixed batch (same weights, t and mask): loss {gap['bf16']:.6f} vs "
                      f"{gap['fp32']:.6f}, a gap of {100 * gap['relative_gap']:.3f}%."]
    if obs is not None:
        mem = f", peak {obs['peak_mem_gib']:.1f} GiB" if obs["peak_mem_gib"] is not None else ""
        lines += ["", f"OBS (deblur loss at {obs['levels']} levels, batch {obs['batch']} images × {obs['levels']} "
                      f"levels per pass, {header['precision']}): **{obs['images_per_s']:.0f} images/s** "
                      f"({obs['pass_ms']:.1f} ms per pass{mem}); the thyroid set's OBS would take "
                      f"{human_time(args.images / obs['images_per_s'])}."]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_bench.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    atomic_write_json(out / "gpu_bench.json", {"header": header, "rows": rows, "obs": obs, "peak_tflops": peak,
                                               "bf16_vs_fp32": gap})
    return path


def main(argv: list[str] | None = None) -> Path:
    check_environment()
    import timm
    import torch

    from d2mae.runtime.device import resolve_device
    from d2mae.runtime.errors import D2maeError

    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except D2maeError as exc:
        print(f"gpu_bench: {exc}", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out or os.environ.get("OUT") or REPO / "benchmarks" / "gpu_results")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, " \
                                                                           f"{os.cpu_count()} cores)"
    peak = args.peak_tflops
    if peak is None and device.type == "cuda" and args.precision != "fp32":
        peak = next((v for k, v in BF16_DENSE_TFLOPS.items() if k in name), None)
    header = {"device_name": name, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "torch": torch.__version__, "timm": timm.__version__, "cuda": torch.version.cuda,
              "command": " ".join(["python", *sys.argv]), "cache_images": args.cache_images,
              "precision": args.precision}
    print(f"gpu_bench on {name}: batch sizes {args.batch_sizes}, modes {args.compile_modes}, "
          f"{args.warmup} + {args.steps} steps each; writing to {out}", flush=True)
    side = int(round(NATIVE * args.img_size))  # stored at native resolution, as the DecodedCache does
    images = synthetic_images(args.cache_images, side, device, args.seed)
    rows: list[dict[str, Any]] = []
    flops_cache: dict[int, float] = {}
    obs = None
    for mode in args.compile_modes:
        for batch in args.batch_sizes:
            try:
                row = measure_training(args, device, batch, mode, images, flops_cache)
            except torch.cuda.OutOfMemoryError:
                print(f"  batch {batch} {mode}: out of GPU memory, skipped", flush=True)
                torch.cuda.empty_cache()
                continue
            rows.append(row)
            print(f"  {row['model']} batch {batch} {mode}: {row['images_per_s']:.1f} img/s, "
                  f"{row['achieved_tflops']:.2f} TFLOP/s"
                  + (f" ({100 * row['achieved_tflops'] / peak:.1f}% of {peak:g})" if peak else "")
                  + (f", peak {row['peak_mem_gib']:.1f} GiB" if row["peak_mem_gib"] is not None else "")
                  + f", loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}", flush=True)
            write_report(out, header, rows, obs, peak, args)
    obs = measure_obs(args, device, images)
    print(f"  OBS: {obs['images_per_s']:.1f} images/s ({obs['levels']} levels)", flush=True)
    gap = measure_loss_gap(args, device, images)
    print(f"  bf16 vs fp32 loss gap: {100 * gap['relative_gap']:.3f}%", flush=True)
    path = write_report(out, header, rows, obs, peak, args, gap)
    print(path.read_text(), flush=True)
    return path


if __name__ == "__main__":
    main()

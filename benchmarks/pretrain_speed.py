"""Pre-training speed: images/s of D²MAE pre-training steps and where the step time goes.

For each model (default ViT-Tiny and ViT-Base, 224 px, MAE decoder 512 wide × 8 blocks) it times real pre-training
steps — the same data path, blur, model, AdamW and lr schedule as ``d2mae pretrain`` — split into

    data       waiting for the next batch (DataLoader or on-device crops of the decoded-image cache)
    blur       the per-sample Gaussian blur at σ_t (timed separately on the same batch; part of the forward)
    forward    the rest of the forward pass (patches, masking, encoder, decoder, loss)
    backward   loss.backward()
    optimizer  AdamW step (+ lr schedule, zero_grad)

and the peak resident memory of the process (``ru_maxrss``; on CUDA also the peak allocated GPU memory). Each model
runs in its own subprocess, so the peak memory is that model's alone.

    python benchmarks/pretrain_speed.py                                   # both models, batch 16, 3 steps
    python benchmarks/pretrain_speed.py --batch-size 64 --steps 1 --warmup 0   # peak memory at the default batch
    python benchmarks/pretrain_speed.py --data ../shared/data/bus-bra/images --models vit_tiny_patch16

Without ``--data`` it writes synthetic 8-bit images (500 × 400 px) to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PHASES = ("data", "blur", "forward", "backward", "optimizer")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synthetic_images(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:400, 0:500]
    for i in range(n):
        img = 0.3 + 0.2 * np.sin(xx / rng.uniform(10, 40)) * np.cos(yy / rng.uniform(10, 40))
        img = img + 0.1 * rng.standard_normal(img.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"s{i:04d}.png")
    return folder


def measure(model_name: str, data: list[str], args: argparse.Namespace) -> dict:
    """Time ``args.steps`` pre-training steps (after ``args.warmup`` untimed ones) of one model in this process."""
    from d2mae.data import cache as data_cache
    from d2mae.data import dataset as data_dataset
    from d2mae.data import sources as data_sources
    from d2mae.data.sampler import EpochBatchSampler
    from d2mae.method.blur import gaussian_blur
    from d2mae.method.models import DeblurMAE
    from d2mae.runtime.device import amp_dtype, autocast, resolve_device
    from d2mae.train.batches import LoaderBatches, MemoryBatches, step_randomness
    from d2mae.train.optim import build_optimizer, warmup_cosine_scheduler
    from d2mae.train.pretrain_config import make_config

    device = resolve_device(args.device)
    cfg = make_config(data=data, out="unused", model=model_name, img_size=args.img_size, batch_size=args.batch_size,
                      mean=[0.5], std=[0.25], precision=args.precision, data_path=args.data_path,
                      decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
                      decoder_num_heads=args.decoder_num_heads)
    refs = data_sources.find_images(cfg.data)
    total = args.warmup + args.steps
    need = cfg.batch_size * total
    refs = (refs * (need // len(refs) + 1))[:need]
    sampler = EpochBatchSampler(len(refs), cfg.batch_size, seed=0)
    if args.data_path == "memory":
        batches = MemoryBatches(data_cache.DecodedCache(refs, cfg.img_size, cfg.in_chans), sampler, device)
    else:
        workers = max(0, min(8, (os.cpu_count() or 1) - 1)) if args.num_workers is None else args.num_workers
        dataset = data_dataset.ImageDataset(refs, cfg.img_size, cfg.in_chans, augment="mae")
        batches = LoaderBatches(dataset, sampler, workers, pin=device.type == "cuda")
    torch.manual_seed(0)
    model = DeblurMAE(cfg.model_config()).to(device).train()
    opt = build_optimizer(model, cfg, cfg.resolved_lr())
    sched = warmup_cosine_scheduler(opt, 1000, 10, 0.0)
    amp = amp_dtype(device, cfg.precision)
    schedule = cfg.model_config().schedule
    times = {p: [] for p in PHASES}
    it = batches.epoch(0, 0)
    for step in range(total):
        _sync(device)
        t0 = time.perf_counter()
        x = next(it).to(device, non_blocking=True)  # [B, C, S, S]
        _sync(device)
        t1 = time.perf_counter()
        drawn = step_randomness(model, 0, 0, step, cfg.batch_size, 0, cfg.batch_size)
        t, noise = drawn["t"].to(device), drawn["noise"].to(device)
        with torch.no_grad():
            gaussian_blur(x, schedule.sigma(t))  # [B, C, S, S]; the model does the same inside its forward
        _sync(device)
        t2 = time.perf_counter()
        with autocast(device, amp):
            loss, _, _ = model(x, t, noise=noise)
        _sync(device)
        t3 = time.perf_counter()
        loss.backward()
        _sync(device)
        t4 = time.perf_counter()
        sched.step_update(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t5 = time.perf_counter()
        if step >= args.warmup:
            blur = t2 - t1
            for name, value in zip(PHASES, (t1 - t0, blur, (t3 - t2) - blur, t4 - t3, t5 - t4)):
                times[name].append(max(value, 0.0))
    mean = {p: float(np.mean(v)) for p, v in times.items()}
    step_time = sum(mean.values())
    result = {
        "model": model_name, "decoder": f"{cfg.decoder_embed_dim}x{cfg.decoder_depth}", "img_size": cfg.img_size,
        "batch_size": cfg.batch_size, "steps": args.steps,
        "device": str(device), "precision": "bf16" if amp is not None else "fp32", "data_path": args.data_path,
        "images_per_s": cfg.batch_size / step_time, "step_s": step_time,
        "share": {p: mean[p] / step_time for p in PHASES},
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": float(loss.detach()),
    }
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16", "vit_base_patch16"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--data-path", default="memory", choices=["loader", "memory"],
                        help="memory (what `d2mae pretrain` picks when the decoded cache fits) or loader")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core); 1 can be faster on a busy CPU")
    parser.add_argument("--decoder-embed-dim", type=int, default=512, help="MAE: 512")
    parser.add_argument("--decoder-depth", type=int, default=8, help="MAE: 8")
    parser.add_argument("--decoder-num-heads", type=int, default=16, help="MAE: 16")
    parser.add_argument("--data", nargs="+", help="image folders (default: synthetic images)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.data, args)), flush=True)
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or [str(_synthetic_images(Path(tmp) / "images", 64))]
        cpu = platform.processor() or platform.machine()
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
        except (OSError, StopIteration):
            pass
        print(f"# pre-training speed, torch {torch.__version__}, {os.cpu_count()} CPU cores ({cpu}), "
              f"torch threads {torch.get_num_threads()}, CUDA: "
              f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
        print(f"# img {args.img_size}px, decoder {args.decoder_embed_dim} wide x {args.decoder_depth} blocks, batch "
              f"{args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, data path {args.data_path}, "
              f"data: {'synthetic' if not args.data else ' '.join(args.data)}, load average "
              f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        header = (f"{'model':<18} {'params':>7} {'img/s':>8} {'step s':>8} " + " ".join(f"{p:>9}" for p in PHASES)
                  + f" {'maxrss MiB':>10} {'precision':>9}")
        print(header)
        for name in args.models:
            cmd = [sys.executable, __file__, "--one", name, "--img-size", str(args.img_size), "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup), "--device",
                   args.device, "--precision", args.precision, "--data-path", args.data_path,
                   "--decoder-embed-dim", str(args.decoder_embed_dim), "--decoder-depth", str(args.decoder_depth),
                   "--decoder-num-heads", str(args.decoder_num_heads), "--data", *data]
            if args.num_workers is not None:
                cmd += ["--num-workers", str(args.num_workers)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{name:<18} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            shares = " ".join(f"{100 * r['share'][p]:>8.1f}%" for p in PHASES)
            extra = f" (GPU peak {r['cuda_peak_mib']:.0f} MiB)" if "cuda_peak_mib" in r else ""
            print(f"{name:<18} {r['params_m']:>6.1f}M {r['images_per_s']:>8.2f} {r['step_s']:>8.3f} {shares} "
                  f"{r['maxrss_mib']:>10.0f} {r['precision']:>9}{extra}")


if __name__ == "__main__":
    main()

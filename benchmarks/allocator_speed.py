"""Freed memory kept in the process (``d2mae.runtime.memory``) against glibc's defaults: step speed, page faults, RSS.

Two steps, each in a fresh subprocess per measurement (the allocator's settings and state are per process),
alternating the two settings for ``--rounds`` rounds, at each ``--threads``:

* ``pretrain``: the busbra-cpu pre-training step (ViT-Tiny/16 at 96 px, decoder 128 × 2, batch 64, the memory
  path's crops of the first 256 BUS-BRA images, or phantoms without them), as :mod:`roofline` runs it;
* ``finetune``: the demo's fine-tuning step (the D²MAE classifier, ViT-Tiny/16 at 64 px, batch 32, fused AdamW).

Each prints the median step time of ``--steps`` steps after ``--warmup``, the minor page faults per step and the
process's peak resident memory.

    python benchmarks/allocator_speed.py                         # 1 and 2 threads, 3 rounds
    python benchmarks/allocator_speed.py --threads 2 --rounds 5 --json-out allocator.json

Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE)]

from demo_time import cpu_model  # noqa: E402  (neither imports torch: the parent process stays light)

from d2mae.runtime.memory import keep_freed_memory, user_chose  # noqa: E402

SETTINGS = ("glibc default", "kept (d2mae)")


def worker(args: argparse.Namespace) -> None:
    applied = keep_freed_memory() if args.setting == SETTINGS[1] else False
    import torch

    torch.set_num_threads(args.threads)
    step = pretrain_step() if args.step == "pretrain" else finetune_step()
    for _ in range(args.warmup):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    print(json.dumps({"applied": applied, "step_s": statistics.median(times), "faults_per_step": faults,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def pretrain_step():
    import roofline
    import torch

    a = argparse.Namespace(model="vit_tiny_patch16", img_size=96, decoder_embed_dim=128, decoder_depth=2,
                           decoder_num_heads=4, batch_size=64, data=None, n_images=256)
    refs = roofline.images_for(a, Path(tempfile.mkdtemp()))
    model, optimizer, cache = roofline.build(a, refs)
    g = torch.Generator().manual_seed(1)
    return lambda: roofline.one_step(model, optimizer, cache, g, a.batch_size)


def finetune_step():
    import torch

    from d2mae.method.model_config import ModelConfig
    from d2mae.method.models import DeblurClassifier
    from d2mae.train.optim import adamw

    torch.manual_seed(0)
    model = DeblurClassifier(ModelConfig(arch="vit_tiny_patch16", img_size=64, mean=[0.45], std=[0.25]), 2).train()
    optimizer = adamw([{"params": list(model.parameters())}], lr=1e-4, betas=(0.9, 0.999))
    x, y = torch.rand(32, 1, 64, 64), torch.randint(0, 2, (32,))  # [B, 1, S, S], [B]
    t = torch.randint(1, 12, (32,)).float()  # [B], each image's t*

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x, t), y).backward()
        optimizer.step()

    return step


def measure(step: str, setting: str, threads: int, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if not user_chose({k: v})}  # each setting as the command line sees it
    cmd = [sys.executable, __file__, "--worker", "--step", step, "--setting", setting, "--threads", str(threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--step", nargs="+", default=["pretrain", "finetune"], choices=["pretrain", "finetune"])
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", default=SETTINGS[0], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        args.step = args.step[0]
        worker(args)
        return []
    cpu = cpu_model()
    print(f"# {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    rows = []
    for step in args.step:
        for threads in args.threads:
            runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
            for r in range(args.rounds):
                for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                    runs[setting].append(measure(step, setting, threads, args))
            base = statistics.median(m["step_s"] for m in runs[SETTINGS[0]])
            for setting in SETTINGS:
                ms = runs[setting]
                row = {"step": step, "threads": threads, "setting": setting,
                       "step_ms": 1000 * statistics.median(m["step_s"] for m in ms),
                       "rounds_ms": [round(1000 * m["step_s"], 1) for m in ms],
                       "faults_per_step": statistics.median(m["faults_per_step"] for m in ms),
                       "peak_rss_mib": max(m["peak_rss_mib"] for m in ms), "applied": all(m["applied"] for m in ms)}
                row["speedup"] = base / (row["step_ms"] / 1000)
                rows.append(row)
    print("| step | threads | allocator | step (ms, median) | rounds (ms) | page faults / step | peak RSS (MiB) | "
          "speed-up |")
    print("|---|---:|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['threads']} | {r['setting']} | {r['step_ms']:.1f} | "
              f"{', '.join(str(x) for x in r['rounds_ms'])} | {r['faults_per_step']:.0f} | {r['peak_rss_mib']:.0f} | "
              f"{r['speedup']:.2f}× |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()

"""What sleeping OpenMP threads cost on an idle machine: a small training step, libgomp's default vs PASSIVE.

Why d2mae keeps libgomp's default wait policy when the machine is idle (docs/threads.md): with short parallel
regions (small models, small images, as in ``d2mae demo``), a thread that sleeps between regions pays a wake-up
each time. Each policy runs in a fresh subprocess (OpenMP reads the policy when PyTorch loads), alternating, for
``--rounds`` rounds; images/s of a ViT-Tiny classifier step (forward, backward, fused AdamW) on random
``--img-size`` px one-channel images, batch ``--batch``.

    python benchmarks/wait_policy_idle.py [--img-size 64] [--batch 32] [--seconds 6] [--rounds 3]

Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

POLICIES = [("libgomp default", {}), ("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"})]


def worker(args: argparse.Namespace) -> None:
    import timm
    import torch

    model = timm.create_model("vit_tiny_patch16_224", img_size=args.img_size, num_classes=2, in_chans=1)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    x = torch.randn(args.batch, 1, args.img_size, args.img_size)  # [B, 1, S, S]
    y = torch.randint(0, 2, (args.batch,))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        step()
        n += 1
    print(n * args.batch / (time.perf_counter() - start))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rates: dict[str, list[float]] = {name: [] for name, _ in POLICIES}
    for _ in range(args.rounds):
        for name, extra in POLICIES:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | extra
            out = subprocess.run([sys.executable, __file__, "--worker", *sys.argv[1:]], env=env, check=True,
                                 capture_output=True, text=True).stdout
            rates[name].append(float(out.strip().splitlines()[-1]))
    print(f"# ViT-Tiny classifier step, {args.img_size} px, batch {args.batch}, {args.rounds} alternating rounds of "
          f"{args.seconds:g} s; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| wait policy | median img/s | rounds |")
    print("|---|---:|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")


if __name__ == "__main__":
    main()

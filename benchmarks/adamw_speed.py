"""AdamW on the CPU: PyTorch's foreach implementation vs the fused one d2mae uses (train/optim.adamw).

    python benchmarks/adamw_speed.py

ms per optimizer step over a ViT-Tiny encoder's parameters (96 px, one channel), random gradients, alternating
foreach / fused twice, 5 untimed + 50 timed steps each.
"""

from __future__ import annotations

import os
import platform
import time

import timm
import torch


def main() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=96, in_chans=1, num_classes=0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = sum(p.numel() for p in model.parameters())
    print(f"# {params / 1e6:.1f} M parameters; {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for fused in (False, True, False, True):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=None if fused else True)
        for _ in range(5):
            opt.step()
        start = time.perf_counter()
        for _ in range(50):
            opt.step()
        print(f"{'fused' if fused else 'foreach'}: {(time.perf_counter() - start) / 50 * 1e3:.1f} ms/step")


if __name__ == "__main__":
    main()

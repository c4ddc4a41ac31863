"""Batched per-sample blur (d2mae.method.blur.gaussian_blur) against blurring one image at a time, side by side.

Usage: python benchmarks/blur_speed.py [--batch 64] [--size 224] [--repeats 5] [--device cpu]

Three ways to blur a batch whose images each have their own σ from the paper's schedule: d2mae's batched matrix
form on the device; torchvision's per-image ``gaussian_blur`` in a Python loop (what a loader does per image); and
``scipy.ndimage.gaussian_filter`` per image. Prints seconds per batch, images/s and the ratio to d2mae, and the
largest difference to scipy.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from scipy.ndimage import gaussian_filter

from d2mae.method.blur import BlurSchedule, gaussian_blur


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    schedule = BlurSchedule()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, args.size, args.size, generator=gen).to(args.device)
    sigma = schedule.sigma(schedule.sample(args.batch, generator=gen)).to(args.device)
    sig_list = sigma.tolist()
    xn = x.cpu().double().numpy()

    def batched() -> torch.Tensor:
        out = gaussian_blur(x, sigma, max_sigma=schedule.sigmas[-1])
        if x.is_cuda:
            torch.cuda.synchronize()
        return out

    def torchvision_loop() -> list[torch.Tensor]:
        return [TF.gaussian_blur(x[i], [2 * int(4 * s + 0.5) + 1] * 2, [s, s]) for i, s in enumerate(sig_list)]

    def scipy_loop() -> list[np.ndarray]:
        return [gaussian_filter(xn[i, 0], s, mode="reflect", truncate=4.0) for i, s in enumerate(sig_list)]

    diff = max(float(np.abs(batched()[i, 0].cpu().numpy() - ref).max()) for i, ref in enumerate(scipy_loop()))
    rows = [("d2mae batched (one matmul pair per batch)", _time(batched, args.repeats)),
            ("torchvision, one image at a time", _time(torchvision_loop, args.repeats)),
            ("scipy.ndimage, one image at a time", _time(scipy_loop, args.repeats))]
    print(f"# batch {args.batch} x 1 x {args.size} x {args.size}, σ ~ U{{0.1..1.1}}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| method | s / batch | images/s | d2mae is faster by |\n|---|---|---|---|")
    base = rows[0][1]
    for name, sec in rows:
        print(f"| {name} | {sec:.4f} | {args.batch / sec:.0f} | {sec / base:.1f}× |")
    print(f"max |d2mae − scipy| = {diff:.2e}")


if __name__ == "__main__":
    main()

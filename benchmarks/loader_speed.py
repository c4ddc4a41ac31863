"""Loader throughput on real images: the per-image DataLoader path versus the in-memory decode cache.

Usage::

    python benchmarks/loader_speed.py [--data ../shared/data/bus-bra/images] [--n 512] [--size 224]
                                      [--batch 64] [--workers 0 2] [--device cpu] [--shards DIR]

Measures, for MAE pre-training views (RandomResizedCrop(S, scale=(0.2, 1)) + flip, images in [0, 1]):

0. ``load_image`` alone: the PNG decode every path pays.
1. ``ImageDataset(augment="mae")`` through a ``DataLoader`` with each number of workers: decode PNG + crop per image.
2. ``DecodedCache``: the one-off cost of decoding every image once at native resolution (threads), its memory,
   then ``cache.batch`` (PIL's antialiased bicubic crops resampled as one batch, :mod:`d2mae.data.resample`) on
   ``--device``.
3. ``ImageDataset(augment="finetune")`` (adds RandAugment + random erasing) with the largest worker count.
4. With ``--shards DIR`` (a ``d2mae shards`` folder of the same images): path 1 on the first ``--n`` images of the
   shards, against path 1 on the same images read as files, in alternating rounds (the median of ``--rounds``).

Prints one Markdown table; images/s are steady-state (the first batch is excluded as warm-up).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from d2mae.data.cache import DecodedCache
from d2mae.data.dataset import ImageDataset
from d2mae.data.decode import load_image
from d2mae.data.shards import ShardSet
from d2mae.data.sources import find_images

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bus-bra" / "images"


def loader_rate(ds: ImageDataset, batch: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=False, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # warm-up (worker start, first decode)
    start, count = time.perf_counter(), 0
    for x, _, _ in it:
        count += x.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--n", type=int, default=512, help="images used")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads in the main process")
    parser.add_argument("--shards", default=None, help="a d2mae shards folder: compare reading from it with files")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the shards comparison")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    refs = find_images([args.data])[: args.n]
    device = torch.device(args.device)
    rows: list[tuple[str, str]] = []
    start = time.perf_counter()
    for ref in refs[:128]:
        load_image(ref)
    rows.append(("load_image only (PNG decode), one process", f"{min(128, len(refs)) / (time.perf_counter() - start):,.0f}"))
    for w in args.workers:
        rate = loader_rate(ImageDataset(refs, args.size, augment="mae"), args.batch, w)
        rows.append((f"ImageDataset mae, DataLoader workers={w}", f"{rate:,.0f}"))

    start = time.perf_counter()
    cache = DecodedCache(refs, args.size)
    build = time.perf_counter() - start
    rows.append(("DecodedCache build (decode at native resolution, once)", f"{len(refs) / build:,.0f}"))
    cache.to(device)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(refs), generator=gen)
    cache.batch(perm[: args.batch], gen)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, count = time.perf_counter(), 0
    for _ in range(3):
        for i in range(0, len(refs) - args.batch + 1, args.batch):
            count += cache.batch(perm[i:i + args.batch], gen).shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    rows.append((f"DecodedCache.batch mae on {device.type}", f"{count / (time.perf_counter() - start):,.0f}"))

    w = max(args.workers)
    rate = loader_rate(ImageDataset(refs, args.size, augment="finetune"), args.batch, w)
    rows.append((f"ImageDataset finetune, DataLoader workers={w}", f"{rate:,.0f}"))

    if args.shards:  # the same images, from tar shards and as files, alternating (machine noise hits both)
        shards = ShardSet.open(args.shards)
        members, files = shards.refs[: args.n], shards.sources[: args.n]
        rates: dict[str, list[float]] = {"files": [], "shards": []}
        for _ in range(args.rounds):
            for name, group in (("files", files), ("shards", members)):
                rates[name].append(loader_rate(ImageDataset(group, args.size, augment="mae"), args.batch, w))
        for name in ("files", "shards"):
            median = sorted(rates[name])[len(rates[name]) // 2]
            rounds = ", ".join(f"{r:,.0f}" for r in rates[name])
            rows.append((f"ImageDataset mae from {name}, DataLoader workers={w} (rounds: {rounds})", f"{median:,.0f}"))

    print(f"# loader speed: {len(refs)} images from {args.data}, S={args.size}, batch {args.batch}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, device {device}; cache memory {cache.nbytes / 2**20:.0f} MiB "
          f"for {len(refs)} images ({cache.nbytes / len(refs) / 1024:.0f} KiB per image)")
    print("| path | images/s |")
    print("|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()

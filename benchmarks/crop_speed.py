"""The memory path's crops on the CPU: each window resampled on its own against one zero-padded batch, side by side.

    python benchmarks/crop_speed.py                        # BUS-BRA beside the repository, 256 images, 96 px
    python benchmarks/crop_speed.py --threads 1 2 --img-size 224 --rounds 5

:class:`d2mae.data.cache.DecodedCache` draws MAE's RandomResizedCrop + flip for a batch and resamples each crop's
window with PIL's antialiased bicubic filter as two matrix products (:func:`d2mae.data.resample.crop_resize`). The
windows differ in size (crop areas 0.2-1 of images of different sizes), so two forms of the same products differ in
work:

* **per window** (``DecodedCache.crops(padded=False)``, what the CPU runs): two products per image at its window's
  own size;
* **padded** (``padded=True``, what an accelerator runs): the windows zero-padded into one batch, two batched
  products.

Both forms get the same images, boxes and flips in each round, the order alternates between rounds, and the largest
difference between their crops is printed (float rounding: about 1e-6).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from d2mae.data.cache import CROP_RATIO, CROP_SCALE, DecodedCache, crop_boxes  # noqa: E402
from d2mae.data.phantom import generate_phantoms  # noqa: E402
from d2mae.data.sources import find_images  # noqa: E402
from d2mae.runtime.machine import machine_info  # noqa: E402

BUSBRA = REPO.parent / "shared" / "data" / "bus-bra" / "images"


def measure(cache: DecodedCache, threads: int, args: argparse.Namespace) -> dict:
    """Milliseconds per batch of each form (median over rounds × batches) and their largest difference."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"per window": [], "padded": []}
    diff = 0.0
    for r in range(args.rounds):
        draws = []
        for _ in range(args.batches):
            idx = torch.randint(0, len(cache), (args.batch_size,), generator=g)
            draws.append((idx, crop_boxes(cache.aspect[idx], CROP_SCALE, CROP_RATIO, g),
                          torch.rand(args.batch_size, generator=g) < 0.5))
        order = ("per window", "padded") if r % 2 == 0 else ("padded", "per window")
        outs: dict[str, list[torch.Tensor]] = {}
        for form in order:
            cache.crops(*draws[0], padded=form == "padded")  # warm-up
            outs[form] = []
            for idx, boxes, flip in draws:
                t0 = time.perf_counter()
                outs[form].append(cache.crops(idx, boxes, flip, padded=form == "padded"))
                times[form].append(time.perf_counter() - t0)
        diff = max([diff] + [float((a - b).abs().max()) for a, b in zip(outs["per window"], outs["padded"])])
    ms = {form: 1000 * statistics.median(v) for form, v in times.items()}
    return {"threads": threads, "per_window_ms": ms["per window"], "padded_ms": ms["padded"],
            "speedup": ms["padded"] / ms["per window"], "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="image folder (default: BUS-BRA beside the repository, else "
                    "phantoms at its stored size)")
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    ap.add_argument("--batches", type=int, default=8, help="timed batches per form per round")
    args = ap.parse_args(argv)
    folder = Path(args.data) if args.data else BUSBRA
    with tempfile.TemporaryDirectory() as tmp:
        if not folder.is_dir():  # phantoms at BUS-BRA's stored size for this model
            folder = generate_phantoms(tmp, n=args.n_images, size=int(round(3.3 * args.img_size)), seed=0) / "images"
        refs = find_images([folder])[:args.n_images]
        cache = DecodedCache(refs, args.img_size)
    print(f"# CPU: {machine_info()['cpu']}; torch {torch.__version__}; {len(refs)} images from {folder}, cached "
          f"at mean {cache.shapes.float().mean(0).round().tolist()} px; crops to {args.img_size} px, batch "
          f"{args.batch_size}; {args.rounds} alternating rounds × {args.batches} batches")
    print("\n| threads | per window (ms / batch) | padded (ms / batch) | padded / per window | max abs diff |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    for threads in args.threads:
        r = measure(cache, threads, args)
        rows.append(r)
        print(f"| {threads} | {r['per_window_ms']:.1f} | {r['padded_ms']:.1f} | {r['speedup']:.2f}× | "
              f"{r['max_abs_diff']:.1e} |", flush=True)
    return rows


if __name__ == "__main__":
    main()

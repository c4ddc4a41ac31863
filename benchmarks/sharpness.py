"""Equivalent σ of every d2mae view against PIL's crop of the original file (docs/views.md), on real images.

Prints, for ``--size`` S and the first ``--images`` images (every ``--stride``-th) of ``--data``:

1. the memory cache's crops (native resolution, PIL's filter on the device) against the reference, for whole-image
   and 0.2-area crops, at native size and for sources upscaled 3× (where the cache stores them smaller);
2. the previous cache design (every image resized once to 1.15 × S, crops by bilinear ``grid_sample``), re-created
   here in a few lines for the before/after comparison;
3. the blur schedule's levels: the equivalent σ of scipy's sampled Gaussian at each σ_t;
4. PIL bicubic against Lanczos-3 for the same boxes (the softness of the filter every path and method shares).

    python benchmarks/sharpness.py --data ../shared/data/bus-bra/images --size 96
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from d2mae.data.cache import DecodedCache
from d2mae.data.dataset import resize_box
from d2mae.data.decode import load_image
from d2mae.data.sharpness import equivalent_sigma
from d2mae.data.sources import find_images


def centred(area: float, h: int, w: int) -> tuple[float, float, float, float]:
    """The narrowest allowed crop (aspect 3/4 in pixels) of ``area``, centred: (cx, cy, w, h) fractions."""
    wf = min(1.0, (area * 0.75 / (w / h)) ** 0.5)
    hf = min(1.0, (area * (w / h) / 0.75) ** 0.5)
    return 0.5, 0.5, wf, hf


def pixels(frac: tuple[float, ...], h: int, w: int) -> tuple[float, float, float, float]:
    cx, cy, fw, fh = frac
    return (cx - fw / 2) * w, (cy - fh / 2) * h, (cx + fw / 2) * w, (cy + fh / 2) * h


def old_cache_crop(arr: np.ndarray, frac: tuple[float, ...], size: int) -> torch.Tensor:
    """The previous memory path: the whole image squashed to 1.15·S square, then a bilinear grid_sample crop."""
    side = round(1.15 * size)
    store = torch.from_numpy(np.rint(resize_box(arr, (0, 0, arr.shape[1], arr.shape[0]), side) * 255) / 255)
    cx, cy, fw, fh = frac
    theta = torch.tensor([[[fw, 0.0, 2 * cx - 1], [0.0, fh, 2 * cy - 1]]], dtype=torch.float32)
    grid = torch.nn.functional.affine_grid(theta, [1, 1, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(store[None].float(), grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "bus-bra" / "images"))
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--stride", type=int, default=200)
    args = ap.parse_args()
    refs = find_images([args.data])[::args.stride][:args.images]
    s = args.size
    print(f"{len(refs)} images of {args.data}, S = {s}; {platform.processor() or platform.machine()}")

    with tempfile.TemporaryDirectory() as tmp:
        big = []
        for ref in refs:
            with Image.open(ref) as im:
                up = im.resize((im.width * 3, im.height * 3), Image.Resampling.LANCZOS)
            big.append(str(Path(tmp) / Path(ref).name))
            up.save(big[-1])
        print("\n| view | crop | equivalent σ, mean (max |σ|) |\n|---|---|---|")
        for name, rr in (("memory cache, native sources", refs), ("memory cache, sources upscaled 3×", big)):
            cache = DecodedCache(rr, s)
            for area in (1.0, 0.2):
                sig = []
                for i, ref in enumerate(rr):
                    a = load_image(ref)
                    frac = centred(area, *a.shape[:2])
                    view = cache.crops(torch.tensor([i]), tuple(torch.tensor([v]) for v in frac))[0]
                    sig.append(equivalent_sigma(view, resize_box(a, pixels(frac, *a.shape[:2]), s)))
                print(f"| {name} | area {area:g} | {np.mean(sig):.3f} ({np.max(np.abs(sig)):.3f}) |")
        for area in (1.0, 0.2):
            sig = []
            for ref in refs:
                a = load_image(ref)
                frac = centred(area, *a.shape[:2])
                sig.append(equivalent_sigma(old_cache_crop(a, frac, s), resize_box(a, pixels(frac, *a.shape[:2]), s)))
            print(f"| previous cache (1.15 × S, bilinear) | area {area:g} | {np.mean(sig):.3f} ({np.max(np.abs(sig)):.3f}) |")

    a = load_image(refs[0])
    ref_view = resize_box(a, pixels(centred(1.0, *a.shape[:2]), *a.shape[:2]), s)[0]
    print("\n| σ_t | " + " | ".join(f"{v:g}" for v in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.1)) + " |")
    print("|---" * 8 + "|")
    eq = [equivalent_sigma(gaussian_filter(ref_view, v, mode="reflect", truncate=4.0), ref_view)
          for v in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.1)]
    print("| equivalent σ (px) | " + " | ".join(f"{v:.3f}" for v in eq) + " |")

    print("\n| S, crop | magnification | PIL bicubic vs Lanczos-3, equivalent σ |\n|---|---|---|")
    for size, area in ((224, 1.0), (224, 0.2), (96, 0.2)):
        rows = []
        for ref in refs:
            g = load_image(ref)[:, :, 0]
            h, w = g.shape
            side = min((area * h * w) ** 0.5, h, w)
            box = (w / 2 - side / 2, h / 2 - side / 2, w / 2 + side / 2, h / 2 + side / 2)
            im = Image.fromarray(g.astype(np.float32))
            bic = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=box))
            lan = np.asarray(im.resize((size, size), Image.Resampling.LANCZOS, box=box))
            rows.append((size / side, equivalent_sigma(bic, lan)))
        m = np.array(rows)
        print(f"| {size}, area {area:g} | {m[:, 0].min():.2f}-{m[:, 0].max():.2f} | {m[:, 1].mean():.3f} |")


if __name__ == "__main__":
    main()

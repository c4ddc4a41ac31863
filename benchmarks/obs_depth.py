"""Is a pre-trained model able to tell blur levels apart? OBS loss depth per image, and how far apart the levels are.

For issue 11's question "why might D²MAE not beat DeblurrMAE at this scale", from the ``obs.csv`` files an
experiment wrote (one per D²MAE run) and from the images:

1. **OBS loss depth per image**: (max - min) / min of the searched levels' reconstruction losses, and where t*
   falls; a model that cannot tell levels apart has a flat curve (depth near 0) and a t* decided by noise.
2. **Level separation in pixels**: on the deterministic ``--size`` px view of ``--n`` BUS-BRA images, the RMS
   difference between the image blurred at σ_t and at σ_(t+1) (d2mae's own blur), against the RMS difference between
   the sharp image and σ = 1.1: are levels 1 and 2 distinguishable at this image size?
3. **Agreement of t\\* across seeds**: for images in two obs.csv files, the fraction with the same t* and the
   Spearman correlation of t*.

    python benchmarks/obs_depth.py RUN_OR_OBS_CSV... [--images ../shared/data/bus-bra/images] [--size 96]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from d2mae.data.dataset import ImageDataset  # noqa: E402
from d2mae.data.sources import find_images  # noqa: E402
from d2mae.method.blur import BlurSchedule, gaussian_blur  # noqa: E402

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "bus-bra" / "images"


def read_obs(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    """obs.csv -> {content hash: (t*, losses at the searched levels)}."""
    if path.is_dir():
        path = path / "obs" / "obs.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols = [c for c in rows[0] if c.startswith("loss_t")]
    return {r["content_hash"]: (int(r["t_star"]), np.array([float(r[c]) for c in cols])) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("obs", nargs="+", help="run folders (with obs/obs.csv) or obs.csv files")
    ap.add_argument("--images", default=str(DEFAULT_IMAGES))
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()

    tables = [read_obs(Path(p)) for p in args.obs]
    print("| obs.csv | images | median depth (max-min)/min | 10th-90th percentile | t* at an end level |")
    print("|---|---:|---:|---|---:|")
    for name, table in zip(args.obs, tables):
        losses = np.stack([v[1] for v in table.values()])  # [N, levels]
        depth = (losses.max(1) - losses.min(1)) / losses.min(1)
        at_end = np.isin(losses.argmin(1), [0, losses.shape[1] - 1]).mean()
        print(f"| {Path(name).name} | {len(table)} | {np.median(depth):.4f} | "
              f"{np.percentile(depth, 10):.4f}-{np.percentile(depth, 90):.4f} | {at_end:.0%} |")
    for (a, ta), (b, tb) in itertools.combinations(zip(args.obs, tables), 2):
        common = sorted(set(ta) & set(tb))
        x = np.array([ta[h][0] for h in common])
        y = np.array([tb[h][0] for h in common])
        rho = spearmanr(x, y).statistic
        print(f"- t* of {Path(a).name} vs {Path(b).name}: same for {np.mean(x == y):.0%} of {len(common)} images, "
              f"Spearman {rho:.2f}")

    refs = find_images([args.images])[:: max(1, len(find_images([args.images])) // args.n)][: args.n]
    ds = ImageDataset(refs, args.size, augment="none")
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # [n, 1, S, S] in [0, 1]
    sigmas = BlurSchedule().sigmas  # [0, σ_1, …, σ_T]
    blurred = [x] + [gaussian_blur(x, torch.full((len(x),), s)) for s in sigmas[1:]]  # T+1 × [n, 1, S, S]
    full = (x - blurred[-1]).pow(2).mean().sqrt().item()
    print(f"\nLevel separation on {len(refs)} images, {args.size} px view (RMS, pixel values in [0, 1]); "
          f"sharp vs σ = {sigmas[-1]:g}: {full:.4f}")
    print("| levels | σ | RMS difference | share of sharp-vs-σmax |")
    print("|---|---|---:|---:|")
    for t in range(len(sigmas) - 1):
        d = (blurred[t] - blurred[t + 1]).pow(2).mean().sqrt().item()
        print(f"| {t} vs {t + 1} | {sigmas[t]:g} vs {sigmas[t + 1]:g} | {d:.2e} | {d / full:.2%} |")

if __name__ == "__main__":
    main()

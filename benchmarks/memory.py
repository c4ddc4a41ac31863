"""Peak memory (resident set) of d2mae pre-training steps on the CPU, one fresh process per configuration.

Each configuration runs in its own subprocess, which sets up a real ``d2mae pretrain`` run (``Pretrainer.setup``: image
check, decoded-image cache of the data set on the in-memory data path, DeblurMAE, AdamW, lr schedule) and takes
``--steps`` optimizer steps with the run's own ``train_step``. ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the
process's peak RSS so far) is read after the imports, after the setup, and after each step; the second step is the
first with AdamW's moment buffers allocated, so two steps reach the steady-state peak.

    python benchmarks/memory.py                                   # ViT-Tiny and ViT-Base, default batch (64)
    python benchmarks/memory.py --models vit_tiny_patch16 --batch-size 32 --n-images 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

BUSBRA = REPO.parent / "shared" / "data" / "bus-bra" / "images"


def maxrss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_batch() -> int:
    """``d2mae pretrain``'s default --batch-size."""
    from d2mae.train.pretrain_config import PretrainConfig

    return next(f.default for f in fields(PretrainConfig) if f.name == "batch_size")


def measure_one(args: argparse.Namespace) -> dict[str, Any]:
    """Set up one run in this (fresh) process and step it; peak RSS after each phase."""
    import torch

    rss = {"imports": maxrss_mib()}
    from speed_vs_reference import D2maeSide

    from d2mae.data import sources as data_sources

    if args.threads:
        torch.set_num_threads(args.threads)
    refs = data_sources.find_images([args.data])
    if args.n_images:
        refs = refs[:args.n_images]
    ns = argparse.Namespace(model=args.one, img_size=args.img_size, batch_size=args.batch_size, seed=0, blr=1.5e-4,
                            lr=None, warmup_steps=0, decoder_embed_dim=args.decoder_embed_dim,
                            decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads)
    with tempfile.TemporaryDirectory() as tmp:
        rss["imports"] = maxrss_mib()
        side = D2maeSide(refs, ns, [0.3], [0.2], args.steps, Path(tmp) / "run", data_path=args.data_path)
        rss["setup"] = maxrss_mib()
        step_s = []
        for k in range(args.steps):
            t0 = time.perf_counter()
            side.step()
            step_s.append(time.perf_counter() - t0)
            rss[f"step{k + 1}"] = maxrss_mib()
        cache = getattr(side.run.batches, "cache", None)
        return {
            "model": args.one, "img_size": args.img_size, "batch_size": args.batch_size, "images": len(refs),
            "data_path": side.run.data_path, "cache_mib": cache.nbytes / 2**20 if cache is not None else 0.0,
            "params_m": sum(p.numel() for p in side.model.parameters()) / 1e6, "rss_mib": rss,
            "peak_mib": max(rss.values()), "step_s": step_s, "threads": torch.get_num_threads(),
        }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_tiny_patch16", "vit_base_patch16"])
    ap.add_argument("--batch-size", type=int, default=None, help="default: d2mae pretrain's default (64)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--data", default=str(BUSBRA))
    ap.add_argument("--n-images", type=int, default=None, help="first N images only (default: all)")
    ap.add_argument("--data-path", default="memory", choices=["memory", "loader"])
    ap.add_argument("--decoder-embed-dim", type=int, default=512)
    ap.add_argument("--decoder-depth", type=int, default=8)
    ap.add_argument("--decoder-num-heads", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model in this process, print JSON
    args = ap.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = default_batch()
    if args.steps < 1:
        ap.error("--steps must be ≥ 1")
    if args.one:
        print("RESULT " + json.dumps(measure_one(args)), flush=True)
        return []

    from speed_vs_reference import loadavg, machine_line

    print(f"# peak memory of d2mae pre-training on the CPU, one fresh process per model: {machine_line()}; date "
          f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"# batch {args.batch_size} (d2mae pretrain's default: {default_batch()}), {args.img_size} px, decoder "
          f"{args.decoder_embed_dim}x{args.decoder_depth}, fp32, {args.steps} steps, data path {args.data_path}, "
          f"data {args.data}{f' (first {args.n_images})' if args.n_images else ''}; load average {loadavg()}")
    print("| model | params | batch | images (cache MiB) | RSS after imports | after setup | peak after steps | "
          "s/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for model in args.models:
        cmd = [sys.executable, __file__, "--one", model, "--batch-size", str(args.batch_size), "--img-size",
               str(args.img_size), "--steps", str(args.steps), "--data", args.data, "--data-path", args.data_path,
               "--decoder-embed-dim", str(args.decoder_embed_dim), "--decoder-depth", str(args.decoder_depth),
               "--decoder-num-heads", str(args.decoder_num_heads)]
        if args.n_images:
            cmd += ["--n-images", str(args.n_images)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"| {model} | failed (exit {proc.returncode}): {tail} |||||||")
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        results.append(r)
        rss = r["rss_mib"]
        print(f"| {model} | {r['params_m']:.1f}M | {r['batch_size']} | {r['images']} ({r['cache_mib']:.0f}) | "
              f"{rss['imports']:.0f} MiB | {rss['setup']:.0f} MiB | **{r['peak_mib']:.0f} MiB** "
              f"({r['peak_mib'] / 1024:.2f} GiB) | {' / '.join(f'{s:.1f}' for s in r['step_s'])} |", flush=True)
    print(f"# load average after: {loadavg()}")
    if args.json_out:
        from d2mae.runtime.files import atomic_write_json
        atomic_write_json(args.json_out, results)
    return results


if __name__ == "__main__":
    main()

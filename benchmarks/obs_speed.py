"""OBS speed: batched search (all levels of a batch in one pass) vs one image and one level at a time, same run;
and OBS time as a share of fine-tuning time (Section 2.3: "OBS is executed only once … negligible overhead").

Usage (prints a Markdown block for benchmarks/RESULTS.md)::

    python benchmarks/obs_speed.py                                   # random ViT-Tiny, 224 px, BUS-BRA images
    python benchmarks/obs_speed.py --model /tmp/busbra-pretrain --n 64 --device cuda
    python benchmarks/obs_speed.py --data some/folder --img-size 96 --n 32

What is timed (after one warm-up pass each, images already decoded to tensors, so the model alone is measured):

* batched: :func:`d2mae.method.obs.search_losses` on batches of ``--batch-size`` images × L levels (``--max-rows`` per pass);
* one at a time: ``model.deblur_loss(x[i:i+1], t)`` for every image i and level t (the per-level loop of Alg. 1);
* end to end: :func:`d2mae.eval.obs.run_obs` (decoding + deterministic view + batched search);
* fine-tuning: forward + backward + AdamW step of the classifier on batches of 32 (``--ft-batch``), blurred at t*,
  giving seconds per training epoch of the same images; the OBS share is OBS / (OBS + epochs × epoch time).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from d2mae.data.dataset import ImageDataset
from d2mae.data.sources import find_images
from d2mae.eval.obs import run_obs
from d2mae.io.artifacts import load_pretrained
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurMAE, build_classifier
from d2mae.method.obs import ObsSpec, search_losses
from d2mae.runtime.device import resolve_device
from d2mae.train.config import FinetuneConfig
from d2mae.train.optim import make_optimizer

BUSBRA = REPO.parent / "shared" / "data" / "bus-bra" / "images"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="pre-trained folder (default: a random ViT-Tiny D²MAE)")
    ap.add_argument("--data", default=str(BUSBRA), help="images (default: BUS-BRA)")
    ap.add_argument("--n", type=int, default=48, help="images timed")
    ap.add_argument("--img-size", type=int, default=224, help="image size of the random model")
    ap.add_argument("--search-step", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-rows", type=int, default=256)
    ap.add_argument("--ft-batch", type=int, default=32)
    ap.add_argument("--ft-epochs", type=int, default=50, help="epochs for the OBS share estimate")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    if args.model:
        model = load_pretrained(args.model, device)
    else:
        model = DeblurMAE(ModelConfig(arch="vit_tiny_patch16", img_size=args.img_size)).to(device).eval()
    cfg = model.config
    refs = find_images([args.data])[: args.n]
    ds = ImageDataset(refs, cfg.img_size, cfg.in_chans, augment="none")
    x = torch.stack([ds[i][0] for i in range(len(refs))]).to(device)  # [N, C, S, S]
    levels = model.schedule.search_levels(args.search_step)
    n, n_levels = len(refs), len(levels)

    def batched() -> None:
        with torch.inference_mode():
            for i in range(0, n, args.batch_size):
                search_losses(model, x[i:i + args.batch_size], levels, args.max_rows)

    def one_at_a_time() -> None:
        with torch.inference_mode():
            for i in range(n):
                for t in levels:
                    model.deblur_loss(x[i:i + 1], torch.tensor([float(t)], device=device))

    def end_to_end() -> None:
        run_obs(model, refs, spec=ObsSpec("search", args.search_step), batch_size=args.batch_size,
                device=device, workers=min(4, os.cpu_count() or 1), max_rows=args.max_rows, progress=False)

    with torch.inference_mode():
        search_losses(model, x[:2], levels)  # warm-up
    t_batched = timed(batched, device)
    t_single = timed(one_at_a_time, device)
    t_e2e = timed(end_to_end, device)

    clf = build_classifier(cfg, 2, "full", 0.1).to(device)
    clf.load_encoder(model.state_dict())
    opt = make_optimizer(clf, FinetuneConfig())
    y = torch.randint(0, 2, (n,), device=device)
    t_star = torch.tensor(levels, device=device, dtype=torch.float32)[torch.randint(0, n_levels, (n,))]
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def train_epoch() -> None:
        clf.train()
        for i in range(0, n, args.ft_batch):
            loss = crit(clf(x[i:i + args.ft_batch], t_star[i:i + args.ft_batch]), y[i:i + args.ft_batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    train_epoch()  # warm-up
    t_epoch = timed(train_epoch, device)
    share_1 = t_e2e / (t_e2e + t_epoch)
    share_e = t_e2e / (t_e2e + args.ft_epochs * t_epoch)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"### OBS speed ({datetime.date.today()})\n")
    print(f"Command: `python benchmarks/obs_speed.py {' '.join(sys.argv[1:])}`  ")
    print(f"Machine: {device.type} ({dev_name}), {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads  ")
    load_after = os.getloadavg()
    print(f"Load average (1/5/15 min) before: {' '.join(f'{v:.1f}' for v in load_before)}, after: "
          f"{' '.join(f'{v:.1f}' for v in load_after)} (a shared machine slows every row alike)  ")
    print(f"Model: {cfg.arch} {cfg.img_size} px ({'pre-trained ' + args.model if args.model else 'random weights'}),"
          f" s = {args.search_step} → L = {n_levels} levels, {n} images\n")
    print("| OBS variant | seconds | images/s | speed-up |")
    print("|---|---|---|---|")
    print(f"| one image, one level at a time ({n}×{n_levels} passes) | {t_single:.2f} | {n / t_single:.1f} | 1.0× |")
    print(f"| batched: {args.batch_size} images × {n_levels} levels per pass | {t_batched:.2f} | "
          f"{n / t_batched:.1f} | {t_single / t_batched:.1f}× |")
    print(f"| batched, end to end (decode + view + search, run_obs) | {t_e2e:.2f} | {n / t_e2e:.1f} | "
          f"{t_single / t_e2e:.1f}× |")
    print()
    print(f"Fine-tuning: {t_epoch:.2f} s per epoch of the same {n} images ({n / t_epoch:.1f} images/s, batch "
          f"{args.ft_batch}, forward + backward + AdamW).  ")
    print(f"OBS share of the fine-tuning time: {100 * share_1:.1f}% of (OBS + 1 epoch); {100 * share_e:.2f}% of "
          f"(OBS + {args.ft_epochs} epochs). One OBS pass costs {t_e2e / t_epoch:.2f} training epochs "
          f"(L = {n_levels} forward passes of the full model per image vs 1 forward + backward of the encoder).")


if __name__ == "__main__":
    main()

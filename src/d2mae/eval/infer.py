"""The one inference loop: a model over every image's deterministic view, in batches, sharded across processes.

OBS (:func:`d2mae.eval.obs.run_obs`), fine-tuning's validation and test predictions and ``d2mae predict`` all run
through :func:`infer`: the images' deterministic view (shorter side to S, centre crop; :class:`ImageDataset` with
``augment="none"``, the same pixels for all three) in batches, ``step(x, t)`` in eval mode without gradients and
under the run's precision. Under torchrun each rank takes its contiguous block of the images
(:func:`d2mae.runtime.distributed.eval_indices`) and the blocks are gathered back in order, so every rank returns all
n rows, each image computed once.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from d2mae.data.dataset import ImageDataset
from d2mae.runtime.device import amp_dtype, autocast, eval_mode
from d2mae.runtime.distributed import DistContext, eval_indices, gather_ordered

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, C, S, S] in [0, 1], t [B]) -> [B, ...]


def infer(model: torch.nn.Module, step: Step, refs: Sequence[str], t: np.ndarray | None, *, img_size: int,
          in_chans: int, out_shape: tuple[int, ...], device: torch.device, batch_size: int = 64, workers: int = 0,
          precision: str = "auto", progress: bool = False, desc: str = "", ctx: DistContext | None = None,
          views: torch.Tensor | None = None) -> np.ndarray:
    """``step`` on every image of ``refs`` at its level ``t`` [n] (``None``: 0), as one array [n, *out_shape].

    Args:
        model: the module ``step`` calls (put in eval mode for the loop, then restored).
        step: ``(x, t) -> [B, *out_shape]`` for a batch of deterministic views and their levels.
        img_size, in_chans: the view's size and channels (the model's).
        device, batch_size, workers, precision: where and how (``precision``: auto = bf16 on capable GPUs).
        progress: a progress bar on rank 0 for more than a few batches, titled ``desc``.
        ctx: this process's place under torchrun (default: one process).
        views: the deterministic views of all ``refs`` already decoded [n, C, S, S] (:func:`decode_views`), for
            images classified again and again (fine-tuning's validation part, every epoch).

    Returns:
        float64 [n, *out_shape] on every rank; row i is image i.
    """
    ctx = ctx or DistContext()
    n = len(refs)
    if n == 0:
        return np.zeros((0, *out_shape))
    mine = eval_indices(n, ctx)  # this rank's block of images (all of them in one process)
    levels = torch.as_tensor(np.zeros(n) if t is None else np.asarray(t), dtype=torch.float32)[mine]  # [n_mine]
    if views is not None:
        mine_views = views[torch.as_tensor(mine, dtype=torch.long)]  # [n_mine, C, S, S]
        loader: Any = ((mine_views[k:k + batch_size], None, torch.arange(k, min(k + batch_size, len(mine))))
                       for k in range(0, len(mine), batch_size))
    else:
        loader = DataLoader(ImageDataset([refs[i] for i in mine], img_size, in_chans, augment="none"),
                            batch_size=batch_size, shuffle=False, num_workers=workers,
                            pin_memory=device.type == "cuda")
    local = torch.zeros(len(mine), *out_shape, device=device)  # [n_mine, ...], row k = image mine[k]
    bar = None
    if progress and ctx.is_main and len(mine) > 4 * batch_size:
        bar = tqdm(total=len(mine), desc=desc, unit="img")
    amp = amp_dtype(device, precision, getattr(model.config, "embed_dim", None))
    with eval_mode(model), torch.inference_mode(), autocast(device, amp):
        for x, _, k in loader:  # k: positions in this rank's block
            out = step(x.to(device, non_blocking=True), levels[k].to(device))  # [B, ...]
            local[k.to(device)] = out.float()
            if bar is not None:
                bar.update(len(k))
    if bar is not None:
        bar.close()
    return gather_ordered(local, n, ctx).cpu().double().numpy()  # [n, ...] on every rank, row i = image i


#: the most memory :func:`decode_views` may take (beyond it, images are decoded per pass)
VIEW_CACHE_BYTES = 512 * 2**20


def decode_views(refs: Sequence[str], img_size: int, in_chans: int, workers: int = 0) -> torch.Tensor | None:
    """The deterministic views of ``refs`` decoded once, float32 [n, C, S, S] (the pixels :func:`infer` would
    decode), or ``None`` when they would take more than :data:`VIEW_CACHE_BYTES`."""
    if len(refs) * in_chans * img_size * img_size * 4 > VIEW_CACHE_BYTES:
        return None
    loader = DataLoader(ImageDataset(list(refs), img_size, in_chans, augment="none"), batch_size=64, shuffle=False,
                        num_workers=workers)
    return torch.cat([x for x, _, _ in loader]) if len(refs) else torch.zeros(0, in_chans, img_size, img_size)


def class_probabilities(model: torch.nn.Module, refs: Sequence[str], t: np.ndarray, device: torch.device,
                        **options: object) -> np.ndarray:
    """Softmax probabilities [n, K] of a classifier on images ``refs`` at their levels ``t`` (Algorithm 1 l. 12);
    ``options`` are :func:`infer`'s (batch_size, workers, precision, progress, desc, ctx)."""
    cfg = model.config
    return infer(model, lambda x, levels: torch.softmax(model(x, levels).float(), dim=-1), refs, t,
                 img_size=cfg.img_size, in_chans=cfg.in_chans, out_shape=(model.num_classes,), device=device,
                 **options)

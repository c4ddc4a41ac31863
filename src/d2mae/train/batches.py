"""Pre-training micro-batches: the memory path (crops on the device from a decoded cache) or the loader path
(DataLoader workers), chosen by :func:`choose_data_path`, and each micro-step's seeded randomness."""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch

from d2mae.data.cache import cache_bytes, crop_boxes
from d2mae.data.dataset import CROP_RATIO, CROP_SCALE, SeededDataset
from d2mae.data.sampler import EpochBatchSampler
from d2mae.runtime.distributed import DistContext
from d2mae.runtime.logs import say
from d2mae.runtime.seeds import STREAM_CROP, STREAM_STEP, derive_seed
from d2mae.train.pretrain_config import PretrainConfig


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _available_memory(device: torch.device) -> int:
    """Bytes free for a data cache on ``device`` (GPU: free device memory; CPU: available RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def choose_data_path(cfg: PretrainConfig, refs: list[str], device: torch.device, ctx: DistContext,
                     own_share: bool = False) -> tuple[str, str]:
    """``memory`` or ``loader``, with the reason. The cache of ``refs`` (native resolution,
    :func:`d2mae.data.cache.cache_bytes`) may use a quarter of the free memory, shared by the processes of a node on
    the CPU — unless each process caches only its own share (``own_share``: shards)."""
    if cfg.data_path == "loader":
        return "loader", "data path loader (asked for)"
    need = cache_bytes(refs, cfg.img_size, cfg.in_chans)
    share = 1 if device.type == "cuda" or own_share else max(1, int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                                  ctx.world_size)))
    budget = _available_memory(device) // 4 // share
    if need <= budget:
        whose = ", each process its own share of the shards" if own_share and ctx.world_size > 1 else ""
        return "memory", f"decoded-image cache {need / 2**20:.0f} MiB on {device}{whose}"
    reason = f"the decoded-image cache ({need / 2**20:.0f} MiB) exceeds a quarter of the free memory on {device}"
    if cfg.data_path == "memory":
        say(ctx, f"note: data path memory: {reason}; using the DataLoader instead")
    return "loader", reason


def step_randomness(model: Any, seed: int, epoch: int, micro_step: int, global_batch: int, rank: int,
                    batch_size: int) -> dict[str, torch.Tensor]:
    """This rank's share of one micro-step's randomness (``model.draw``: t [B] and mask noise [B, N] for the masked
    autoencoder), as CPU tensors.

    Drawn for the whole global batch [B·W] from a generator seeded by ``(seed, epoch, micro_step)`` and then
    sliced, so sample j of the global batch gets the same draw whichever rank processes it: a W-process run
    equals one process with batch B·W.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, micro_step, STREAM_STEP))
    drawn = model.draw(g, global_batch)  # each [B·W, ...]
    lo = rank * batch_size
    return {k: v[lo:lo + batch_size] for k, v in drawn.items()}


class MemoryBatches:
    """Micro-batches cropped on the device from a :class:`d2mae.data.cache.DecodedCache` (no DataLoader).

    The crop boxes and flips are drawn for the whole global batch [B·W] from a generator seeded by
    ``(seed, epoch, micro-step)`` and sliced per rank, like the objective's randomness. The crops are PIL's
    antialiased bicubic resampling of the cached native-resolution images (:func:`d2mae.data.resample.crop_resize`),
    as sharp as the loader path's. ``views`` independent crops per image (MoCo v3: 2) come as [B, V, C, S, S].
    """

    def __init__(self, cache: Any, sampler: EpochBatchSampler, device: torch.device, views: int = 1,
                 scale: tuple[float, float] | None = None) -> None:
        self.cache = cache.to(device)
        self.sampler = sampler
        self.views = views
        self.scale = tuple(scale or CROP_SCALE)  # None: MAE's
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation)

    def plan(self, epoch: int, micro_step: int) -> tuple[torch.Tensor, list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]]:
        """This rank's images [B] and, per view, its crop boxes (cx, cy, w, h) [B] each and flips [B]."""
        s = self.sampler
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, s.permutation(epoch))
        gidx = self._order[1][micro_step * s.global_batch:(micro_step + 1) * s.global_batch]  # [B·W]
        g = torch.Generator().manual_seed(derive_seed(s.seed, epoch, micro_step, STREAM_CROP))
        mine = slice(s.rank * s.batch_size, (s.rank + 1) * s.batch_size)
        views = []
        for _ in range(self.views):
            boxes = crop_boxes(self.cache.aspect[gidx], self.scale, CROP_RATIO, g)  # 4 × [B·W]
            flip = torch.rand(s.global_batch, generator=g) < 0.5  # [B·W]
            views.append((tuple(b[mine] for b in boxes), flip[mine]))
        return gidx[mine], views

    def epoch(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        for m in range(start, self.sampler.micro_steps):
            idx, views = self.plan(epoch, m)
            crops = [self.cache.crops(idx, boxes, flip) for boxes, flip in views]  # V × [B, C, S, S]
            yield crops[0] if self.views == 1 else torch.stack(crops, dim=1)  # [B, C, S, S] or [B, V, C, S, S]


class LoaderBatches:
    """Micro-batches from a DataLoader over :class:`d2mae.data.dataset.SeededDataset` with the sampler as its batch
    sampler."""

    def __init__(self, dataset: Any, sampler: EpochBatchSampler, num_workers: int, pin: bool) -> None:
        self.sampler = sampler
        self.loader = torch.utils.data.DataLoader(
            SeededDataset(dataset), batch_sampler=sampler, num_workers=num_workers, pin_memory=pin,
            persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)

    def epoch(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        self.sampler.set_epoch(epoch, start)
        for x, _, _ in self.loader:  # images [B, C, S, S], labels, indices
            yield x

"""Deterministic, resumable, sharded training batches (pre-training and fine-tuning, one or more processes)."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from d2mae.runtime.errors import D2maeError
from d2mae.runtime.seeds import STREAM_AUGMENT, STREAM_ORDER, derive_seed


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Deterministic, resumable, sharded training batches of ``(index, augmentation seed)`` pairs.

    Args:
        num_samples: size of the data set.
        batch_size: samples per rank per micro-step (B).
        seed: the run's seed.
        rank, world_size: this process's place (W processes; global micro-batch B·W).
        steps_multiple: the number of micro-steps per epoch is rounded down to a multiple of this (the gradient
            accumulation), so every optimizer step sees ``accum_iter`` full micro-batches; the remaining images of
            the epoch's permutation are not used in that epoch (``drop_last``, as MAE).
        weights: optional per-sample weights [num_samples]; each epoch's order is then ``num_samples`` indices drawn
            with replacement in proportion to them (as ``WeightedRandomSampler``) instead of a permutation.
        min_last: keep the epoch's last, partial global batch when it holds at least this many samples (and at
            least one per rank) instead of dropping it; it is split over the ranks as evenly as possible, in rank
            order (fine-tuning; ``None``: drop it, as MAE pre-training). Needs ``steps_multiple`` 1.

    ``set_epoch(epoch, start)`` chooses the epoch and the first micro-step to yield (a resumed run skips the
    micro-steps it already did, without loading them).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 steps_multiple: int = 1, weights: Sequence[float] | torch.Tensor | None = None,
                 min_last: int | None = None) -> None:
        self.num_samples = int(num_samples)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)  # [num_samples]
        if self.weights is not None and self.weights.shape != (self.num_samples,):
            raise ValueError(f"{tuple(self.weights.shape)} weights for {self.num_samples} samples")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.global_batch = self.batch_size * self.world_size
        if min_last is not None and steps_multiple != 1:
            raise ValueError("min_last needs steps_multiple 1")
        full = (self.num_samples // self.global_batch) // steps_multiple * steps_multiple
        rest = self.num_samples - full * self.global_batch
        keep = min_last is not None and rest >= max(min_last, self.world_size)
        self.last_size = rest if keep else 0  # the last, partial global batch (0: none)
        self.micro_steps = full + keep
        if self.micro_steps == 0:
            need = self.global_batch * steps_multiple
            raise D2maeError(f"{self.num_samples} training image(s) are fewer than one optimizer step needs "
                             f"({need} = --batch-size {self.batch_size} × --accum-iter {steps_multiple} × "
                             f"{self.world_size} process(es)); lower --batch-size or --accum-iter")
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.micro_steps:
            raise ValueError(f"start micro-step {start} outside 0..{self.micro_steps}")
        self.epoch = int(epoch)
        self.start = int(start)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's global order of the data set [num_samples] (the same on every rank): a permutation, or with
        ``weights`` a draw with replacement."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, STREAM_ORDER))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        return torch.randperm(self.num_samples, generator=g)

    def sample_seeds(self, epoch: int) -> torch.Tensor:
        """One augmentation seed per data-set index for this epoch [num_samples] int64 (with ``weights``: per
        position of the epoch's order, so that an image drawn twice is augmented twice differently)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, STREAM_AUGMENT))
        return torch.randint(0, 2**62, (self.num_samples,), generator=g, dtype=torch.int64)

    def step_size(self, micro_step: int) -> int:
        """Samples in micro-step ``micro_step``'s global batch: B·W, or fewer in a kept last, partial batch."""
        return self.last_size if self.last_size and micro_step == self.micro_steps - 1 else self.global_batch

    def rank_slice(self, size: int) -> slice:
        """This rank's part of a global batch of ``size`` samples: the r-th B of a full one; a partial one is
        split as evenly as possible, in rank order."""
        base, extra = divmod(size, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return slice(lo, lo + base + (self.rank < extra))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.permutation(self.epoch)  # [num_samples]
        seeds = self.sample_seeds(self.epoch)  # [num_samples]
        seeds = (seeds[perm] if self.weights is None else seeds).tolist()  # the seed at each position of perm
        perm = perm.tolist()
        for m in range(self.start, self.micro_steps):
            part = self.rank_slice(self.step_size(m))
            lo, hi = m * self.global_batch + part.start, m * self.global_batch + part.stop
            yield list(zip(perm[lo:hi], seeds[lo:hi]))

    def __len__(self) -> int:
        return self.micro_steps - self.start


def rank_share(n: int, rank: int, world: int) -> slice:
    """Process ``rank``'s contiguous share of ``n`` images in shard order: W parts whose sizes differ by ≤ 1."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (rank < extra))


class ShardShareSampler(EpochBatchSampler):
    """Batches of ``(index, seed)`` from this process's share of a shard set (indices local to the share).

    Every process runs the same number of micro-steps, those of the smallest share (``min_samples``); each epoch
    shuffles the share in windows of ``window`` images (window order and the images inside each window, seeded by
    seed, rank and epoch), so that a loader reads one shard after another instead of seeking across all of them.
    ``set_epoch(epoch, start)`` resumes at a micro-step, as the parent class.
    """

    def __init__(self, num_samples: int, min_samples: int, batch_size: int, seed: int, rank: int,
                 steps_multiple: int = 1, window: int = 1000) -> None:
        super().__init__(min_samples, batch_size, derive_seed(seed, rank), steps_multiple=steps_multiple)
        self.num_samples = int(num_samples)  # the share; micro_steps were counted on the smallest share
        self.window = max(1, int(window))

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, STREAM_ORDER))
        starts = torch.arange(0, self.num_samples, self.window)
        out = []
        for s in starts[torch.randperm(len(starts), generator=g)].tolist():
            size = min(self.window, self.num_samples - s)
            out.append(s + torch.randperm(size, generator=g))
        return torch.cat(out)

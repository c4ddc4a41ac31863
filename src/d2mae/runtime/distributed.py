"""More than one process: torchrun, DistributedDataParallel, sharded data, ordered gathering.

One machine, 8 GPUs (the same command as a single-process run, under ``torchrun``)::

    torchrun --nproc_per_node 8 -m d2mae pretrain --data DIR --out runs/pt --batch-size 128

Several machines: ``torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 --nproc_per_node 8 ...``.
CPU-only (gloo): ``torchrun --nproc_per_node 2 -m d2mae pretrain ... --device cpu``.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_distributed` reads them and joins the process
group (``nccl`` on CUDA, ``gloo`` on CPU). Without them everything here is a no-op for a single process, so the
library code calls these helpers unconditionally.

Two ways to split data across ranks:

* Training — :class:`EpochBatchSampler`. Every epoch has one global permutation (seeded by ``(seed, epoch)``);
  micro-step ``m`` takes the global batch ``perm[m·B·W : (m+1)·B·W]`` and rank ``r`` takes the ``r``-th slice of
  ``B`` of it, so the ranks' shards are disjoint and their union is exactly what one process with batch ``B·W``
  sees. Each sample also gets its own augmentation seed from ``(seed, epoch, index)``, which does not depend on the
  rank, the batch layout, the number of loader workers, or whether the run was resumed. With per-sample
  ``weights`` (class-balanced fine-tuning) the epoch's global order is instead drawn with replacement, and sliced
  the same way; fine-tuning also keeps the epoch's last, partial global batch (``min_last``), split evenly over the
  ranks.
* Evaluation — :func:`eval_indices` gives rank ``r`` a contiguous block of the ``n`` items, padded to equal length
  by repeating the last item; after each rank computes its outputs, :func:`gather_ordered` concatenates the blocks
  from all ranks and drops the padding, returning exactly ``n`` rows in the original order, with no duplicates.
  Typical use (OBS, prediction)::

      idx = eval_indices(len(refs), ctx)                 # this rank's indices (padded)
      out = torch.stack([score(refs[i]) for i in idx])   # [len(idx), ...] on this rank
      all_out = gather_ordered(out, len(refs), ctx)      # [n, ...] on every rank, row i = item i
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from d2mae.runtime.device import resolve_device
from d2mae.runtime.errors import D2maeError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its global rank, the number of processes, its GPU index on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and prints progress."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise D2maeError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None


def context_from_env() -> DistContext:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (a single process when they are absent)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise D2maeError(f"environment RANK={rank} WORLD_SIZE={world} is inconsistent; launch with torchrun")
    return DistContext(rank=rank, world_size=world, local_rank=local)


def init_distributed(device: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group when launched by torchrun and pick this rank's device.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` (each rank then uses ``cuda:LOCAL_RANK``) or ``cuda:N``.

    Returns:
        The context and this rank's device. Backend: ``nccl`` for CUDA devices, ``gloo`` for CPU.
    """
    ctx = context_from_env()
    dev = resolve_device(device)
    if not ctx.enabled:
        return ctx, dev
    if dev.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise D2maeError(f"LOCAL_RANK {ctx.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                             "lower --nproc_per_node")
        dev = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size)
    return ctx, dev


@contextlib.contextmanager
def distributed_run(device: str = "auto") -> Iterator[tuple[DistContext, torch.device]]:
    """:func:`init_distributed` for the length of one command; leaves the process group at the end only if it
    joined it here (a caller that had joined it, such as a test or a notebook, keeps it)."""
    owned = not (dist.is_available() and dist.is_initialized())
    ctx, dev = init_distributed(device)
    try:
        yield ctx, dev
    finally:
        if owned:
            shutdown()


def shutdown() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (plain picklable values: lists, dicts, numbers, strings)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(ctx: DistContext, fn: Any) -> Any:
    """Run ``fn`` on rank 0 only and hand its result (or its D2maeError) to every rank: for work that writes files
    or warns (image checks, the leak guard) but whose result every rank needs."""
    result: Any = None
    error: str | None = None
    if ctx.is_main:
        try:
            result = fn()
        except D2maeError as exc:
            if not ctx.enabled:
                raise
            error = str(exc)
    result, error = broadcast_object((result, error), ctx)
    if error is not None:
        raise D2maeError(error)
    return result


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (and return it)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wrap_ddp(model: torch.nn.Module, device: torch.device, ctx: DistContext) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (unchanged for one process).

    Every trainable parameter of DeblurMAE and DeblurClassifier takes part in every step, so
    ``find_unused_parameters`` stays off; the buffers (fixed position embeddings, the data set's mean/std, the
    linear probe's BatchNorm statistics, kept equal by :class:`d2mae.method.models.GlobalBatchNorm1d`) are identical on
    all ranks and are not re-broadcast.
    """
    if not ctx.enabled:
        return model

    ids = [device.index] if device.type == "cuda" else None
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False, **no_buffer_sync)


def eval_indices(n_total: int, ctx: DistContext) -> list[int]:
    """Rank ``ctx.rank``'s contiguous block of ``range(n_total)``, padded by repeating the last index so that all
    ranks have ``ceil(n_total / W)`` items (collectives need equal shapes). Use with :func:`gather_ordered`."""
    if n_total < 1:
        return []
    per = math.ceil(n_total / ctx.world_size)
    block = list(range(ctx.rank * per, min((ctx.rank + 1) * per, n_total)))
    return block + [n_total - 1] * (per - len(block))


def gather_ordered(tensor: torch.Tensor, n_total: int, ctx: DistContext) -> torch.Tensor:
    """All ranks' results of :func:`eval_indices` in the original order, padding dropped: [n_total, ...].

    Args:
        tensor: this rank's outputs [ceil(n_total / W), ...], row k belongs to ``eval_indices(n_total, ctx)[k]``;
            on the rank's device (CUDA for nccl, CPU for gloo).
        n_total: the number of items before padding.

    Returns:
        [n_total, ...] on every rank; row i is item i, each item exactly once.
    """
    if not ctx.enabled:
        return tensor[:n_total]
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)[:n_total]


def gather_ordered_objects(items: Sequence[Any], n_total: int, ctx: DistContext) -> list[Any]:
    """:func:`gather_ordered` for picklable Python values (paths, strings, dicts): a list of ``n_total`` items."""
    if not ctx.enabled:
        return list(items)[:n_total]
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part][:n_total]

"""Seeds: every random number of a run comes from a generator seeded by ``(seed, ...)`` keys.

That is what makes a run reproducible on the CPU, a resumed run equal an uninterrupted one, and W processes equal
one process with a W-times larger batch: the draws depend on ``(seed, epoch, step or image)``, never on the rank,
the loader worker or a restart.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

# Purposes of the derived random streams (the last key of derive_seed).
STREAM_ORDER = 0  # the epoch's permutation of the data
STREAM_AUGMENT = 1  # the per-sample augmentation seeds
STREAM_STEP = 2  # blur levels t and mask noise of a micro-step
STREAM_CROP = 3  # crops and flips of the in-memory pre-training data path


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU generator seeded the same way for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer keys, e.g. ``derive_seed(seed, epoch, step, purpose)``.

    Built on :class:`numpy.random.SeedSequence`, so nearby keys give unrelated streams and the value is the same on
    every machine and Python version. Training draws every random number (data order, augmentation, blur level t,
    mask noise) from generators seeded this way, which is what makes a resumed run equal an uninterrupted one.
    """
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative, got {keys}")
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) >> 1


def generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``keys``."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of Python, NumPy, torch (and CUDA) as tensors and plain values only.

    The result survives ``torch.save`` + ``torch.load(weights_only=True)``: NumPy's state array becomes an int64
    tensor, Python's state tuple an int64 tensor plus plain numbers.
    """
    version, mt_state, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored when the same devices exist)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)

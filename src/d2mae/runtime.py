"""Where a run executes and how its artefacts reach disk: device, seeds, precision, atomic writes.

Every file d2mae writes goes through :func:`atomic_write_bytes` (temp file in the same folder, fsync, rename), so a
run killed at any instant leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from d2mae.errors import D2maeError


def _default_mode(fd: int) -> None:
    """Give a ``mkstemp`` file (created 0600) the permissions a plain ``open`` would: 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~umask)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _default_mode(fd)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB chunks; an unreadable file is an ``OSError`` for the caller."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an explicit device that is missing is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise D2maeError(f"option --device: unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise D2maeError("option --device: cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU generator seeded the same way for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def amp_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Autocast dtype: bf16 on CUDA devices that support it (``auto``), else full fp32 (``None``).

    On CPU ``auto`` means fp32: bf16 autocast on CPUs without native bf16 units is slower, not faster.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise D2maeError(f"option --precision: unknown value '{precision}'; use auto, bf16 or fp32")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode for the block, restoring its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------------------------
# Resumable runs: derived seeds, RNG snapshots, checkpoints, the learning-rate schedule
# --------------------------------------------------------------------------------------------------------------------

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


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[Any]:
    """A binary file handle whose content replaces ``path`` atomically when the block ends without error.

    Like :func:`atomic_write_bytes`, but streams (a ViT-B resume state is over a gigabyte; no second copy in memory).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _default_mode(fd)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` a resume state atomically. Only tensors and plain Python values: loadable with
    ``torch.load(weights_only=True)`` (checked here, so a bad state fails at save time, not at resume time)."""
    _check_plain(state, "state")
    with atomic_writer(path) as fh:
        torch.save(state, fh)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a resume state with ``torch.load(weights_only=True)`` onto the CPU; unreadable files are clear errors."""
    path = Path(path)
    if not path.is_file():
        raise D2maeError(f"resume checkpoint {path} does not exist; check the path or drop --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise D2maeError(f"resume checkpoint {path} cannot be read ({first[:200]}); "
                         "delete it to start over") from None
    if not isinstance(state, dict):
        raise D2maeError(f"resume checkpoint {path} does not hold a d2mae resume state")
    return state


_PLAIN = (type(None), bool, int, float, str, torch.Tensor, torch.Size, torch.dtype, torch.device)


def _check_plain(obj: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` would not load (numpy arrays, custom classes)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            _check_plain(value, f"{where}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN) or isinstance(obj, np.generic):
        raise TypeError(f"{where}: {type(obj).__name__} cannot be loaded with weights_only=True")


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                            min_lr: float) -> Any:
    """Per-step schedule of MAE pre-training: linear warm-up from 0, then half-cosine down to ``min_lr``.

    timm's ``CosineLRScheduler`` with ``t_in_epochs=False`` and ``warmup_prefix=True``; call
    ``scheduler.step_update(num_updates=step)`` before optimizer step ``step`` (0-based). The base lr is each param
    group's ``lr`` when the scheduler is made. Its ``state_dict()`` holds plain values only.
    """
    import logging

    from timm.scheduler import CosineLRScheduler

    warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
    timm_log = logging.getLogger("timm.scheduler.cosine_lr")
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)  # its "no effect when t_initial = 1" warning: a one-step decay is intended here
    try:
        return CosineLRScheduler(optimizer, t_initial=max(1, int(total_steps) - warmup_steps), lr_min=min_lr,
                                 warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    finally:
        timm_log.setLevel(level)


class StopSignals:
    """Turns SIGTERM/SIGINT into a flag that training loops check after each step, so that they can write a
    checkpoint and exit cleanly; a second SIGINT stops at once. Handlers are installed in the main thread only.

    Usage: ``with StopSignals() as stop: ... if stop.signum is not None: save, then raise``.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

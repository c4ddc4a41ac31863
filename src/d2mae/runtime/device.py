"""Where a run executes: the device, its precision (bf16 autocast on capable GPUs) and eval mode."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from d2mae.runtime.errors import D2maeError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an explicit device that is missing is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise D2maeError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N", option="device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise D2maeError("cuda was asked for but no CUDA device is available; use --device cpu", option="device")
    return device


def amp_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Autocast dtype: bf16 on CUDA devices that support it (``auto``), else full fp32 (``None``).

    On CPU ``auto`` means fp32: bf16 autocast on CPUs without native bf16 units is slower, not faster.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise D2maeError(f"unknown value '{precision}'; use auto, bf16 or fp32", option="precision")
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

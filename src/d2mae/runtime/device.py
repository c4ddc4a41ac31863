"""Where a run executes: the device, its precision (bf16 autocast on capable GPUs) and eval mode."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from timm.layers import use_fused_attn

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


@dataclass(frozen=True)
class DevicePlan:
    """What a run does on a kind of device: its autocast dtype, whether AdamW runs PyTorch's fused kernel, and
    whether attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA)."""

    device_type: str
    amp: torch.dtype | None
    fused_adamw: bool
    sdpa: bool


def plan_for(device_type: str, precision: str = "auto", bf16_supported: bool = False) -> DevicePlan:
    """The decisions for a device, as pure data: a test can ask what a CUDA device with bf16 would get without one.

    ``auto`` precision is bf16 autocast on CUDA devices that support it, else fp32 (``None``): on CPUs without
    native bf16 units bf16 autocast is slower, not faster. AdamW is fused on CUDA and CPU (PyTorch ≥ 2.4 has both
    kernels). Attention is timm's fused path (SDPA) wherever timm enables it.
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise D2maeError(f"unknown value '{precision}'; use auto, bf16 or fp32", option="precision")
    if precision == "bf16":
        amp: torch.dtype | None = torch.bfloat16
    elif precision == "auto" and device_type == "cuda" and bf16_supported:
        amp = torch.bfloat16
    else:
        amp = None
    return DevicePlan(device_type, amp, fused_adamw=device_type in ("cuda", "cpu"), sdpa=use_fused_attn())


def amp_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Autocast dtype of :func:`plan_for` on this device: bf16 on CUDA devices that support it (``auto``), else fp32
    (``None``)."""
    bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return plan_for(device.type, precision, bf16_supported=bf16).amp


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

"""Where a run executes: the device, its precision (bf16 autocast where the hardware has bf16 units and it pays) and
eval mode."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from timm.layers import use_fused_attn
from torch.nn.attention import SDPBackend, sdpa_kernel

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


#: /proc/cpuinfo flags of native bf16 arithmetic: AVX512-BF16 (AMD Zen 4 and 5, Intel since Cooper Lake), AMX
#: (Intel since Sapphire Rapids), and Arm's BF16 extension.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
#: The narrowest encoder for which ``auto`` takes bf16 autocast on such a CPU: ViT-Tiny's. bf16 was measured faster
#: at every model from the demo's ViT-Tiny at 64 px (1.31×) to ViT-B/16 (1.70×) on the 2-core AMD EPYC
#: (benchmarks/bf16_speed.py; docs/threads.md); narrower models (test-sized ones) were not measured and stay fp32.
BF16_MIN_WIDTH = 192


@dataclass(frozen=True)
class DevicePlan:
    """What a run does on a kind of device: its autocast dtype and why, whether AdamW runs PyTorch's fused kernel,
    and whether attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on
    CUDA)."""

    device_type: str
    amp: torch.dtype | None
    fused_adamw: bool
    sdpa: bool
    why: str = ""

    @property
    def precision(self) -> str:
        return "bf16" if self.amp is torch.bfloat16 else "fp32"


def plan_for(device_type: str, precision: str = "auto", bf16_supported: bool = False,
             width: int | None = None) -> DevicePlan:
    """The decisions for a device, as pure data: a test can ask what a CUDA device, or a CPU with bf16 units, would
    get without one.

    ``auto`` precision is bf16 autocast on CUDA devices that support it, and on CPUs with native bf16 units
    (``bf16_supported``: :func:`cpu_has_bf16`) for an encoder at least :data:`BF16_MIN_WIDTH` wide (``width``);
    else fp32 (``None``): without bf16 units, or for a narrow model, bf16 autocast is not faster. ``bf16`` and
    ``fp32`` force either. AdamW is fused on CUDA and CPU (PyTorch ≥ 2.4 has both kernels). Attention is timm's
    fused path (SDPA) wherever timm enables it.
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise D2maeError(f"unknown value '{precision}'; use auto, bf16 or fp32", option="precision")
    bf16: torch.dtype | None = torch.bfloat16
    if precision != "auto":
        amp, why = (bf16 if precision == "bf16" else None), f"--precision {precision}"
    elif device_type == "cuda":
        amp, why = (bf16, "auto: a CUDA device with bf16") if bf16_supported else (None, "auto: a GPU without bf16")
    elif device_type == "cpu" and not bf16_supported:
        amp, why = None, "auto: a CPU without native bf16 units"
    elif device_type == "cpu" and width is not None and width >= BF16_MIN_WIDTH:
        amp, why = bf16, f"auto: a CPU with native bf16 units, an encoder {width} wide (≥ {BF16_MIN_WIDTH})"
    elif device_type == "cpu" and width is None:
        amp, why = None, "auto: a model without a ViT encoder on a CPU (bf16 measured on ViTs only)"
    elif device_type == "cpu":
        amp, why = None, f"auto: an encoder narrower than {BF16_MIN_WIDTH} on a CPU (bf16 not measured faster there)"
    else:
        amp, why = None, f"auto: {device_type}"
    return DevicePlan(device_type, amp, fused_adamw=device_type in ("cuda", "cpu"), sdpa=use_fused_attn(), why=why)


def cpu_has_bf16(flags: str | None = None) -> bool:
    """Whether this CPU (or the ``flags`` line of ``/proc/cpuinfo`` given) has native bf16 arithmetic."""
    if flags is None:
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        except OSError:
            return False
        lines = [line for line in text.splitlines() if line.startswith(("flags", "Features"))]
        flags = lines[0] if lines else ""
    words = set(flags.replace(":", " ").split())
    return any(f in words for f in CPU_BF16_FLAGS)


def device_plan(device: torch.device, precision: str = "auto", width: int | None = None) -> DevicePlan:
    """:func:`plan_for` for this device: its bf16 support read from the hardware."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        bf16 = device.type == "cpu" and cpu_has_bf16()
    return plan_for(device.type, precision, bf16_supported=bf16, width=width)


def amp_dtype(device: torch.device, precision: str = "auto", width: int | None = None) -> torch.dtype | None:
    """Autocast dtype of :func:`device_plan` (``None``: fp32)."""
    return device_plan(device, precision, width).amp


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` for the forward pass (``None``: none).

    On a CPU, bf16 autocast also routes attention through SDPA's math path (batched products and a softmax in fp32:
    it upcasts bf16 inputs on the CPU), because PyTorch's CPU flash-attention kernels run slower in bf16 than in fp32
    at ViT shapes; the linear layers, most of a ViT's work, still run in bf16 (docs/threads.md has the measurement).
    """
    if dtype is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
        if device.type == "cpu" and dtype == torch.bfloat16:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        yield


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode for the block, restoring its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

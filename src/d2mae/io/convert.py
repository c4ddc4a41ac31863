"""Tensor conversions for importing weights into a model of another shape: position embeddings resized (and the blur
token's position added), the patch projection from 3 channels to 1, MAE's decoder head to another channel count."""

from __future__ import annotations

import math

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv

from d2mae.method.models import sincos_pos_embed_2d
from d2mae.runtime.errors import D2maeError


def _prefix_count(length: int) -> int:
    """Prefix tokens of a position embedding with ``length`` rows over a square grid (1: MAE/timm, 2: d2mae)."""
    for prefix in (1, 2, 0):
        if length - prefix > 0 and math.isqrt(length - prefix) ** 2 == length - prefix:
            return prefix
    raise D2maeError(f"position embedding with {length} rows is not prefix tokens + a square grid of patches")


def convert_pos_embed(src: torch.Tensor, target: torch.Tensor, name: str, notes: list[str]) -> torch.Tensor:
    """[1, p_src + g_src², D] → the target's [1, p + g², D]: prefix rows adapted, grid regenerated or resampled."""
    src = src.reshape(1, -1, src.shape[-1]).float()  # [1, L, D]
    dim = src.shape[-1]
    if dim != target.shape[-1]:
        raise ValueError(f"{name}: width {dim} vs the model's {target.shape[-1]}")
    p_src = _prefix_count(src.shape[1])
    g_src = math.isqrt(src.shape[1] - p_src)
    p_tgt = _prefix_count(target.shape[1])
    g_tgt = math.isqrt(target.shape[1] - p_tgt)
    grid = src[:, p_src:]  # [1, g_src², D]
    if g_src != g_tgt:
        fixed = sincos_pos_embed_2d(dim, g_src, 0) if dim % 4 == 0 else None
        if fixed is not None and torch.allclose(grid, fixed, atol=1e-4):
            grid = sincos_pos_embed_2d(dim, g_tgt, 0)
            notes.append(f"{name}: fixed 2-D sin-cos grid regenerated for {g_tgt}×{g_tgt} patches "
                         f"(was {g_src}×{g_src})")
        else:
            grid = resample_abs_pos_embed(grid, new_size=[g_tgt, g_tgt], old_size=[g_src, g_src], num_prefix_tokens=0)
            notes.append(f"{name}: resampled {g_src}×{g_src} → {g_tgt}×{g_tgt} (bicubic, timm)")
    rows = [src[:, :1] if p_src >= 1 else torch.zeros(1, 1, dim)]  # CLS
    if p_tgt == 2:
        if p_src == 2:
            rows.append(src[:, 1:2])
        else:
            rows.append(torch.zeros(1, 1, dim))  # BLU(t)'s position: zero, like the sin-cos prefix rows
            notes.append(f"{name}: zero row inserted for the blur token (N+1 → N+2 positions)")
    elif p_src == 2:
        notes.append(f"{name}: the blur token's row dropped (this model has no blur token)")
    return torch.cat(rows + [grid], dim=1).to(target.dtype)  # [1, p_tgt + g_tgt², D]


def convert_patch_weight(src: torch.Tensor, target: torch.Tensor, notes: list[str]) -> torch.Tensor:
    """Patch projection [D, C_src, p, p] → [D, C, p, p] (timm ``adapt_input_conv``: 3→1 sums the RGB filters)."""
    if src.shape[0] != target.shape[0] or src.shape[2:] != target.shape[2:]:
        raise ValueError(f"patch_embed.proj.weight: {tuple(src.shape)} vs the model's {tuple(target.shape)} "
                         "(width or patch size differ)")
    if src.shape[1] != target.shape[1]:
        notes.append(f"patch_embed.proj.weight: {src.shape[1]} → {target.shape[1]} input channel(s) "
                     f"({'sum over RGB' if target.shape[1] == 1 else 'repeated, rescaled'}, as timm adapt_input_conv)")
        src = adapt_input_conv(target.shape[1], src.float())
    return src.to(target.dtype)


def convert_decoder_pred(src: torch.Tensor, target: torch.Tensor, c_src: int, c_tgt: int, name: str,
                         notes: list[str]) -> torch.Tensor:
    """decoder_pred rows [p*p*C_src, …] → [p*p*C, …]; rows are ordered (pixel, channel), channel fastest (MAE)."""
    if c_src == c_tgt or src.shape[0] % c_src or target.shape[0] % c_tgt:
        return src.to(target.dtype)
    pixels = src.shape[0] // c_src
    rows = src.float().reshape(pixels, c_src, *src.shape[1:])  # [p*p, C_src, (Dd)]
    if c_tgt == 1:
        out = rows.mean(dim=1)  # gray prediction = mean of the RGB predictions
        how = "mean of the three RGB rows per pixel"
    else:
        out = rows.repeat_interleave(c_tgt, dim=1).reshape(pixels * c_tgt, *src.shape[1:])
        how = "gray row repeated per channel"
    notes.append(f"{name}: {c_src} → {c_tgt} output channel(s) ({how})")
    return out.reshape(target.shape[0], *src.shape[1:]).to(target.dtype)

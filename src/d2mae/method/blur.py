"""The blur schedule and the batched, per-sample Gaussian blur (paper Eq. 1, Sections 2.2-2.3).

One schedule and one blur function serve pre-training (t ~ U{1..T}), optimal blurriness search (t = 1, 1+s, ...),
fine-tuning (t*) and prediction. The blur runs on the model's device on a whole batch at once, each sample with its
own σ: a separable Gaussian written as two matrix products, ``G_σ(x) = A_σ · x · A_σᵀ``, where ``A_σ`` holds the 1-D
kernel with scipy's ``reflect`` border (``d c b a | a b c d``) folded in. The result equals
``scipy.ndimage.gaussian_filter(x, σ, mode="reflect", truncate=4.0)`` everywhere, borders included, up to float
rounding. The per-sample matrices are built on the device from σ with tensor ops: no host sync, no Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from d2mae.runtime.errors import D2maeError

TRUNCATE = 4.0  # kernel radius = int(TRUNCATE * σ + 0.5), as scipy.ndimage.gaussian_filter


@dataclass(frozen=True)
class BlurSchedule:
    """The fixed-step σ schedule {σ_1 < … < σ_T} of Section 2.2; level 0 means no blur (σ_0, the original image).

    Args:
        start: σ_1 (paper: 0.1).
        stop: σ_T (paper: 1.1; Table 3a also 0.6 and 1.6).
        step: the fixed interval (paper: 0.1). ``start == stop`` gives one level (DeblurrMAE's fixed σ).
        enabled: ``False`` for plain MAE: T = 0 and every level is 0 (no blur).
    """

    start: float = 0.1
    stop: float = 1.1
    step: float = 0.1
    enabled: bool = True

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if not (self.start > 0 and math.isfinite(self.start)):
            raise D2maeError(f"σ_1 must be a number > 0, got {self.start}", option="sigma_start")
        if not (self.step > 0 and math.isfinite(self.step)):
            raise D2maeError(f"the σ interval must be a number > 0, got {self.step}", option="sigma_step")
        if not math.isfinite(self.stop) or self.stop < self.start:
            raise D2maeError(f"σ_T ({self.stop}) must not be below σ_1 ({self.start})", option="sigma_stop")
        if self.num_levels > 1000:
            raise D2maeError(f"the σ schedule {self.start}→{self.stop} step {self.step} has {self.num_levels} "
                             "levels; use a larger interval", option="sigma_step")

    def to_dict(self) -> dict[str, float | bool]:
        """The stored form (model ``config.json`` fields, OBS tables): ``{start, stop, step, enabled}``."""
        return {"start": self.start, "stop": self.stop, "step": self.step, "enabled": self.enabled}

    @classmethod
    def from_dict(cls, data: dict[str, float | bool]) -> "BlurSchedule":
        return cls(float(data["start"]), float(data["stop"]), float(data["step"]), bool(data["enabled"]))

    @property
    def num_levels(self) -> int:
        """T, the number of blur levels (0 when blur is disabled)."""
        if not self.enabled:
            return 0
        return int(math.floor((self.stop - self.start) / self.step + 1e-6)) + 1

    @property
    def sigmas(self) -> list[float]:
        """[σ_0 = 0, σ_1, …, σ_T], rounded to 6 decimals so that 0.1 + 2·0.1 prints as 0.3."""
        return [0.0] + [round(self.start + i * self.step, 6) for i in range(self.num_levels)]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ_t for a tensor of levels ``t`` [B] (integer or fractional; 0 gives 0)."""
        t = t.float()
        return torch.where(t > 0, self.start + (t - 1) * self.step, torch.zeros_like(t)).clamp_min(0)

    def level_of(self, sigma: float) -> float:
        """The level t of a σ inside the schedule's range (fractional between grid points); 0 for σ = 0."""
        if sigma == 0:
            return 0.0
        if not self.enabled:
            raise D2maeError(f"σ = {sigma} was asked for but this model was pre-trained without blur (MAE)")
        if not (self.start - 1e-9 <= sigma <= self.sigmas[-1] + 1e-9):
            raise D2maeError(f"σ = {sigma} is outside the model's blur schedule {self.start}→{self.sigmas[-1]}; "
                             "choose a σ inside it")
        return 1.0 + (sigma - self.start) / self.step

    def sample(self, batch: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ U{1, …, T} per sample [B] (float); all zeros when blur is disabled."""
        if self.num_levels == 0:
            return torch.zeros(batch, device=device)
        t = torch.randint(1, self.num_levels + 1, (batch,), generator=generator)
        return t.float().to(device)

    def search_levels(self, search_step: int) -> list[int]:
        """The levels t = 1, 1+s, 1+2s, … ≤ T that OBS visits with step s (Algorithm 1 line 4); ``[0]`` when the
        schedule has no blur. The OBS rule (:class:`d2mae.method.obs.ObsSpec`) holds the step."""
        return list(range(1, self.num_levels + 1, search_step)) if self.num_levels else [0]


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Map any integer index onto [0, n) with scipy's half-sample symmetric ``reflect`` rule."""
    idx = torch.remainder(idx, 2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def blur_matrices(sigma: torch.Tensor, n: int, max_sigma: float) -> torch.Tensor:
    """Per-sample [B, n, n] matrices A with (A·v)[i] = Σ_k g_σ(k) · v[reflect(i + k)]: 1-D Gaussian blurs of ``v``.

    Built with tensor ops on ``sigma``'s device (no host sync, no Python loop, ``torch.compile``-friendly). Each
    sample's kernel is cut at its own radius ``int(4σ + 0.5)`` as scipy does; ``max_sigma`` (a Python number, e.g.
    the schedule's σ_T) fixes the tap count. σ = 0 gives the identity.
    """
    radius = max(int(TRUNCATE * max_sigma + 0.5), 0)
    offsets = torch.arange(-radius, radius + 1, device=sigma.device)  # [K]
    sig = sigma.double()[:, None]  # [B, 1]
    taps = torch.exp(-0.5 * (offsets.double() / sig.clamp_min(1e-12)) ** 2)  # [B, K]
    own_radius = torch.floor(TRUNCATE * sig + 0.5)  # [B, 1]
    taps = torch.where(offsets.abs().double() <= own_radius, taps, torch.zeros_like(taps))
    taps = (taps / taps.sum(dim=1, keepdim=True)).float()  # [B, K], each row sums to 1
    cols = _reflect(torch.arange(n, device=sigma.device)[:, None] + offsets[None, :], n)  # [n, K]
    b, k = taps.shape
    mats = torch.zeros(b, n, n, device=sigma.device)
    mats.scatter_add_(2, cols.expand(b, n, k), taps[:, None, :].expand(b, n, k))
    return mats  # [B, n, n]


def blur_matrix(sigma: float, n: int) -> torch.Tensor:
    """The [n, n] blur matrix of one σ (see :func:`blur_matrices`)."""
    return blur_matrices(torch.tensor([float(sigma)]), n, float(sigma))[0]


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float | None = None) -> torch.Tensor:
    """Blur each image of a batch with its own σ, on ``x``'s device, in one batched matrix product.

    Always fp32: under autocast (bf16 on GPUs) the blur is computed outside it, since a bf16 blur of a
    0.1-pixel σ would be rounding noise.

    Args:
        x: images [B, C, H, W] (any float dtype; computed in fp32).
        sigma: standard deviations [B]; 0 leaves that image unchanged.
        max_sigma: an upper bound of ``sigma`` known in advance (the schedule's σ_T); ``None`` reads
            ``sigma.max()``, which waits for the device.

    Returns:
        The blurred batch [B, C, H, W], fp32.
    """
    if x.ndim != 4 or sigma.shape != (x.shape[0],):
        raise ValueError(f"expected x [B, C, H, W] and sigma [B], got {tuple(x.shape)} and {tuple(sigma.shape)}")
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        sigma = sigma.to(x.device)
        if max_sigma is None:
            max_sigma = float(sigma.max()) if sigma.numel() else 0.0
        _, _, h, w = x.shape
        rows = blur_matrices(sigma, h, max_sigma)  # [B, H, H]
        cols = rows if w == h else blur_matrices(sigma, w, max_sigma)  # [B, W, W]
        return rows[:, None] @ x @ cols[:, None].transpose(-1, -2)  # [B, 1, H, H] @ [B, C, H, W] @ [B, 1, W, W]


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DDPM's sinusoidal timestep embedding [B, dim] of levels ``t`` [B] (Section 2.2, BLU(t); Ho et al. 2020).

    DDPM's ``get_timestep_embedding``: with h = dim // 2 frequencies ω_i = max_period^(−i / (h − 1)),
    i = 0 … h−1, the embedding is [sin(t·ω_0), …, sin(t·ω_{h−1}), cos(t·ω_0), …, cos(t·ω_{h−1})], zero-padded to an
    odd ``dim``.
    """
    half = dim // 2
    if half < 2:
        raise ValueError(f"the sinusoidal embedding needs dim ≥ 4, got {dim}")
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]  # [B, dim/2]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb

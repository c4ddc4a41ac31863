"""DiffMAE (Wei et al., ICCV 2023): diffusion models as masked autoencoders — the "DiffMAE, US" row of Table 2.

The encoder sees the visible patches, clean, exactly as MAE's (75% masked). The masked patches are noised at a
diffusion step t ~ U{1..T}::

    x_t = √ᾱ_t · x₀ + √(1 − ᾱ_t) · ε,    ε ~ N(0, I),  x₀ = the masked patches' (normalised) pixels

and a decoder conditioned on the visible encoding predicts x₀ from x_t; the loss is the mean squared error over the
masked patches only. The decoder is the cross-attention design: its tokens are the noisy masked patches (a linear
embedding, the 2-D sin-cos position of each patch and the sinusoidal embedding of t), and each decoder block is
self-attention among them, cross-attention to the visible encoding (the encoder's last layer, projected to the decoder
width, CLS included) and an MLP. Noise schedules: ``cosine`` (improved DDPM, s = 0.008) and ``linear`` (DDPM,
β from 1e-4 to 0.02), T = 1000.

Where the choices are ours (the authors released no code): the timestep embedding added to the decoder tokens, the
cross-attention reading the encoder's last layer (not layer by layer), and no CLIP target. Fine-tuning uses the
encoder exactly as MAE's (``encoder.*`` weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from d2mae.method.blur import BlurSchedule, sinusoidal_embedding
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import LAYER_NORM, DeblurEncoder, _init_weights, patchify, sincos_pos_embed_2d
from d2mae.method.objective import Objective


def alphas_cumprod(steps: int, schedule: str = "cosine") -> torch.Tensor:
    """ᾱ_t for t = 0 … T [T + 1] in float64: ᾱ_0 = 1 (clean), decreasing towards 0 at T.

    ``cosine``: ᾱ_t = f(t)/f(0), f(t) = cos²(π/2 · (t/T + s)/(1 + s)), s = 0.008, each β_t = 1 − ᾱ_t/ᾱ_{t−1} clipped
    at 0.999 (Nichol & Dhariwal 2021). ``linear``: β_t evenly from 1e-4 to 0.02 (× 1000/T), ᾱ_t = Π (1 − β) (Ho et al.).
    """
    if schedule == "cosine":
        s = 0.008
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    elif schedule == "linear":
        scale = 1000 / steps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}")
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, dim=0)])


def seeded_normal(seeds: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One standard normal tensor of ``shape`` per seed [B] -> [B, *shape], each from its own generator on
    ``device``: a sample's noise depends on its seed only (not on the batch, the rank or a resume)."""
    out = torch.empty(len(seeds), *shape, device=device)
    for i, s in enumerate(seeds.tolist()):
        out[i] = torch.randn(shape, generator=torch.Generator(device).manual_seed(int(s)), device=device)
    return out


class CrossSelfBlock(nn.Module):
    """Decoder block: self-attention among the noisy tokens, cross-attention to the visible encoding, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = LAYER_NORM(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = LAYER_NORM(dim)
        self.norm_memory = LAYER_NORM(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm3 = LAYER_NORM(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x [B, M, D] (noisy masked tokens), memory [B, 1 + N_keep, D] (visible encoding) -> [B, M, D]."""
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        m = self.norm_memory(memory)
        x = x + self.cross_attn(self.norm2(x), m, m, need_weights=False)[0]
        return x + self.mlp(self.norm3(x))


class DiffMAE(Objective):
    """The DiffMAE pre-training model: MAE's encoder on visible patches + a denoising cross-attention decoder."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = DeblurEncoder(config)
        ddim, pixels = config.decoder_embed_dim, config.patch_size ** 2 * config.in_chans
        self.memory_embed = nn.Linear(config.embed_dim, ddim)
        self.noisy_embed = nn.Linear(pixels, ddim)
        self.time_embed = nn.Sequential(nn.Linear(ddim, ddim), nn.SiLU(), nn.Linear(ddim, ddim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(ddim, config.img_size // config.patch_size, 0))
        self.decoder_blocks = nn.ModuleList(CrossSelfBlock(ddim, config.decoder_num_heads, config.mlp_ratio)
                                            for _ in range(config.decoder_depth))
        self.decoder_norm = LAYER_NORM(ddim)
        self.decoder_pred = nn.Linear(ddim, pixels)
        self.register_buffer("alphas_cumprod", alphas_cumprod(config.diffusion_steps, config.diffusion_schedule).float())
        for module in (self.memory_embed, self.noisy_embed, self.time_embed, self.decoder_blocks, self.decoder_norm,
                       self.decoder_pred):
            module.apply(_init_weights)

    @property
    def schedule(self) -> BlurSchedule:
        return self.encoder.schedule

    def draw(self, generator: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        """One step's randomness for ``n`` samples, on the CPU: mask noise [n, N], diffusion steps t ∈ {1..T} [n]
        and a seed per sample for its Gaussian noise ε [n]."""
        noise = torch.rand(n, self.config.num_patches, generator=generator)
        step = torch.randint(1, self.config.diffusion_steps + 1, (n,), generator=generator)
        seed = torch.randint(0, 2**62, (n,), generator=generator)
        return {"noise": noise, "step": step, "eps_seed": seed}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] → [B, N, p*p*C] (MAE's order)."""
        return patchify(imgs, self.config.patch_size)

    def noised(self, x0: torch.Tensor, step: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε for patches x₀ [B, M, P] at steps ``step`` [B]."""
        a = self.alphas_cumprod[step].view(-1, 1, 1)  # [B, 1, 1]
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None, step: torch.Tensor | None = None,
                eps_seed: torch.Tensor | None = None, mask_ratio: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pre-training step on images ``x`` [B, C, S, S] in [0, 1] (randomness from :meth:`draw`, drawn here
        when absent). Returns (loss, prediction of the masked patches [B, M, P], mask [B, N] with 1 = masked)."""
        b, dev = x.shape[0], x.device
        if noise is None or step is None or eps_seed is None:
            drawn = self.draw(torch.Generator().manual_seed(int(torch.randint(2**62, ()))), b)
            noise, step, eps_seed = (drawn[k].to(dev) for k in ("noise", "step", "eps_seed"))
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        t0 = torch.zeros(b, device=dev)  # no blur
        latent, mask, _ = self.encoder(x, t0, ratio, noise)  # the visible patches, clean: [B, 1 + N_keep, D]
        n = self.config.num_patches
        masked = torch.argsort(noise, dim=1)[:, int(n * (1 - ratio)):]  # [B, M], the masked patches' indices
        target = self.patchify(self.encoder.normalize(x.float()))  # [B, N, P], the original normalised pixels
        pixels = target.shape[-1]
        x0 = torch.gather(target, 1, masked.unsqueeze(-1).expand(-1, -1, pixels))  # [B, M, P]
        eps = seeded_normal(eps_seed, tuple(x0.shape[1:]), dev)  # [B, M, P]
        xt = self.noised(x0, step.to(dev), eps)  # noise on the masked patches only
        pos = torch.gather(self.decoder_pos_embed.expand(b, -1, -1), 1,
                           masked.unsqueeze(-1).expand(-1, -1, self.decoder_pos_embed.shape[-1]))  # [B, M, Dd]
        t_emb = self.time_embed(sinusoidal_embedding(step.to(dev), self.config.decoder_embed_dim))  # [B, Dd]
        tokens = self.noisy_embed(xt.to(latent.dtype)) + pos + t_emb[:, None].to(latent.dtype)  # [B, M, Dd]
        memory = self.memory_embed(latent)  # [B, 1 + N_keep, Dd]
        for block in self.decoder_blocks:
            tokens = block(tokens, memory)
        pred = self.decoder_pred(self.decoder_norm(tokens))  # [B, M, P], the clean masked patches
        return F.mse_loss(pred.float(), x0), pred, mask

"""A reference D²MAE pre-training written the way existing MAE research code does it (the speed baseline).

This is the "typical research code" that :mod:`benchmarks.speed_vs_reference` compares d2mae against: the same
method (paper Section 2.2, Eqs. 1-3), the same architecture and sizes, the same optimizer, written as MAE's public
code (``models_mae.py`` / ``main_pretrain.py`` / ``engine_pretrain.py``) plus the blur of DeblurrMAE-style code:

* data — :class:`BlurDataset`, a ``torch.utils.data.Dataset`` used in ``DataLoader`` worker processes. Per image:
  PIL decodes the file, torchvision's ``RandomResizedCrop(S, scale=(0.2, 1.0), bicubic)`` + ``RandomHorizontalFlip``
  (MAE's pre-training transform), then the worker samples the blur level ``t ~ U{1..T}`` and blurs that ONE image
  with PIL's ``ImageFilter.GaussianBlur(σ_t)`` (or OpenCV's ``cv2.GaussianBlur``), converts both the blurred and
  the original crop to tensors and normalises them. The item is ``(blurred, original, t)``.
* model — :class:`ReferenceDeblurMAE`, MAE's ``MaskedAutoencoderViT`` with the blur token of Eq. 2
  (``[CLS, BLU(t), E_1..E_N] + P``, BLU(t) = learnable vector + DDPM sinusoidal embedding of t), timm ``Block`` s
  with *unfused* attention (explicit ``softmax(q kᵀ / √d) v``; ``fused_attn`` switched off on every block), fp32,
  and the loss on every patch against the original image (Eq. 3). Same sizes as :class:`d2mae.method.models.DeblurMAE`,
  so both do the same FLOPs; :func:`load_from_d2mae` copies a DeblurMAE's weights into it (the parameters
  correspond one to one), which is how the comparison starts both from the same initial weights.
* training — :func:`train_step`: MAE's per-iteration warm-up + half-cosine lr (``adjust_learning_rate``), AdamW
  (β = 0.9, 0.95, weight decay on weight matrices only, timm ``param_groups_weight_decay``), fp32, ``loss.item()``
  every step.

It is deliberately not a strawman: same batch, same model, same optimizer, same lr schedule, loader workers for the
data; only the implementation choices differ (per-image CPU blur in workers vs. d2mae's batched on-device blur,
unfused vs. fused attention, per-epoch PNG decoding vs. a decoded-image cache).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Attention, Block
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

BLUR_BACKENDS = ("pil", "opencv")


# ---------------------------------------------------------------------------------------------------------------
# data: decode, crop, flip, blur one image at a time in the loader workers
# ---------------------------------------------------------------------------------------------------------------

class BlurDataset(Dataset):
    """MAE's pre-training dataset plus a per-sample Gaussian blur at a random level (DeblurrMAE-style code).

    Args:
        paths: image files (8-bit grayscale or colour; converted to ``L`` for one channel, ``RGB`` for three).
        img_size: crop side S.
        sigmas: ``[σ_1, …, σ_T]`` of the blur schedule (paper: 0.1, 0.2, …, 1.1).
        mean, std: per-channel normalisation in [0, 1] units (the data set's statistics).
        in_chans: 1 or 3.
        blur_backend: ``pil`` (``ImageFilter.GaussianBlur``, radius = σ) or ``opencv`` (``cv2.GaussianBlur``).

    ``__getitem__`` returns ``(blurred [C, S, S], original [C, S, S], t)``, both normalised; ``t`` is an int in 1..T.
    The random choices use torch's and Python's generators, which ``DataLoader`` seeds per worker from its base seed.
    """

    def __init__(self, paths: Sequence[str], img_size: int, sigmas: Sequence[float], mean: Sequence[float],
                 std: Sequence[float], in_chans: int = 1, blur_backend: str = "pil") -> None:
        if blur_backend not in BLUR_BACKENDS:
            raise ValueError(f"blur_backend must be one of {BLUR_BACKENDS}, got {blur_backend!r}")
        if blur_backend == "opencv":
            try:
                import cv2  # noqa: F401
            except ImportError:
                raise ValueError("blur_backend 'opencv' needs OpenCV: pip install opencv-python-headless") from None
        self.paths = list(paths)
        self.sigmas = [float(s) for s in sigmas]
        self.mode = "L" if in_chans == 1 else "RGB"
        self.blur_backend = blur_backend
        # MAE main_pretrain.py: RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=3) + flip
        self.crop = transforms.Compose([
            transforms.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip()])
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.paths)

    def blur(self, img: Image.Image, sigma: float) -> Image.Image:
        """Eq. 1 on one image: G_σ(x), on the CPU, in this worker."""
        if self.blur_backend == "pil":
            return img.filter(ImageFilter.GaussianBlur(radius=sigma))
        import cv2

        arr = cv2.GaussianBlur(np.asarray(img), (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
        return Image.fromarray(arr)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        with Image.open(self.paths[i]) as f:
            img = f.convert(self.mode)
        img = self.crop(img)
        t = random.randint(1, len(self.sigmas))  # t ~ U{1..T}, sampled in the worker
        blurred = self.blur(img, self.sigmas[t - 1])
        return self.to_tensor(blurred), self.to_tensor(img), t  # [C, S, S], [C, S, S], int


def make_loader(dataset: BlurDataset, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """MAE's loader: shuffled, ``drop_last``, worker processes (seeded from ``seed`` through the generator)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed),
                      persistent_workers=False)


# ---------------------------------------------------------------------------------------------------------------
# model: MAE's MaskedAutoencoderViT + the blur token, unfused attention
# ---------------------------------------------------------------------------------------------------------------

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_tokens: int) -> np.ndarray:
    """MAE's util/pos_embed.py: [cls_tokens + grid², D] fixed 2-D sin-cos embeddings (zeros for the prefix)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

    def emb_1d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([emb_1d(embed_dim // 2, grid[0]), emb_1d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([cls_tokens, embed_dim]), emb], axis=0)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DDPM's sinusoidal timestep embedding [B, dim] of levels ``t`` [B] (frequencies 10000^(−i/(h−1)))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def unfuse_attention(model: nn.Module) -> int:
    """Switch every timm ``Attention`` of ``model`` to the explicit ``softmax(q kᵀ) v`` path; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = False
            count += 1
    return count


@dataclass
class ReferenceConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0

    @classmethod
    def from_d2mae(cls, cfg: "object") -> "ReferenceConfig":
        """The same sizes as a :class:`d2mae.method.models.ModelConfig`."""
        return cls(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
                   depth=cfg.depth, num_heads=cfg.num_heads, decoder_embed_dim=cfg.decoder_embed_dim,
                   decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads, mlp_ratio=cfg.mlp_ratio)


class ReferenceDeblurMAE(nn.Module):
    """MAE's ``MaskedAutoencoderViT`` with a blur token after CLS (Eq. 2) and the loss on all patches (Eq. 3).

    Takes images that the data loader already blurred and normalised; attention is unfused on every block.
    """

    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        d, dd = cfg.embed_dim, cfg.decoder_embed_dim
        # --- encoder
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blur_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 2, d), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.ModuleList([Block(d, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(cfg.depth)])
        self.norm = norm_layer(d)
        # --- decoder
        self.decoder_embed = nn.Linear(d, dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 2, dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(dd, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True,
                                                   norm_layer=norm_layer) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = norm_layer(dd)
        self.decoder_pred = nn.Linear(dd, cfg.patch_size ** 2 * cfg.in_chans, bias=True)
        self.initialize_weights()
        unfuse_attention(self)

    def initialize_weights(self) -> None:
        grid = int(self.patch_embed.num_patches ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.cfg.embed_dim, grid, 2)).float()[None])
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(get_2d_sincos_pos_embed(self.cfg.decoder_embed_dim, grid, 2)).float()[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.blur_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] → [B, N, p²C]."""
        p, c = self.cfg.patch_size, self.cfg.in_chans
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p ** 2 * c)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)  # [B, N]
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, dim))  # [B, N_keep, D]
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)  # [B, N]
        return x_masked, mask, ids_restore

    def forward_encoder(self, x: torch.Tensor, t: torch.Tensor, mask_ratio: float,
                        noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(x)  # [B, N, D]
        x = x + self.pos_embed[:, 2:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_tokens = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # [B, 1, D]
        blu = self.blur_token + timestep_embedding(t, self.cfg.embed_dim)[:, None] + self.pos_embed[:, 1:2, :]
        x = torch.cat((cls_tokens, blu, x), dim=1)  # [B, 2 + N_keep, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # [B, 2 + N_keep, Dd]
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 2 - x.shape[1], 1)
        x_ = torch.cat([x[:, 2:, :], mask_tokens], dim=1)  # no prefix tokens
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :2, :], x_], dim=1) + self.decoder_pos_embed  # [B, 2 + N, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 2:, :]  # [B, N, p²C]

    def forward_loss(self, target_imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Eq. 3: MSE between the prediction and the original (un-blurred) image, over every patch."""
        target = self.patchify(target_imgs)
        loss = (pred - target) ** 2
        return loss.mean(dim=-1).mean()

    def forward(self, imgs_blur: torch.Tensor, imgs: torch.Tensor, t: torch.Tensor, mask_ratio: float = 0.75,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs_blur, t, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred), pred, mask


def load_from_d2mae(model: ReferenceDeblurMAE, d2mae_state: dict[str, torch.Tensor]) -> None:
    """Copy a :class:`d2mae.method.models.DeblurMAE` state dict into the reference (``encoder.`` prefix dropped; the
    normalisation buffers, which the reference keeps in its data loader, left out). Every tensor must match."""
    state = {}
    for key, value in d2mae_state.items():
        if key in ("encoder.pixel_mean", "encoder.pixel_std"):
            continue
        state[key[len("encoder."):] if key.startswith("encoder.") else key] = value
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# training: MAE's engine_pretrain.train_one_epoch, one iteration at a time
# ---------------------------------------------------------------------------------------------------------------

def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW(β = 0.9, 0.95); no weight decay on biases, norms and the CLS/BLU/mask tokens."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=("cls_token", "blur_token",
                                                                                  "mask_token"))
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, step: int, base_lr: float, warmup_steps: int,
                         total_steps: int, min_lr: float = 0.0) -> float:
    """MAE's util/lr_sched.py, per iteration: linear warm-up, then half-cycle cosine to ``min_lr``."""
    if step < warmup_steps:
        lr = base_lr * step / warmup_steps
    else:
        span = max(1, total_steps - warmup_steps)
        lr = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def train_step(model: ReferenceDeblurMAE, optimizer: torch.optim.Optimizer, batch: tuple, step: int, base_lr: float,
               warmup_steps: int, total_steps: int, device: torch.device, mask_ratio: float = 0.75) -> float:
    """One iteration of MAE's ``train_one_epoch``: lr, forward, backward, AdamW step; returns ``loss.item()``."""
    imgs_blur, imgs, t = batch
    adjust_learning_rate(optimizer, step, base_lr, warmup_steps, total_steps)
    imgs_blur = imgs_blur.to(device, non_blocking=True)
    imgs = imgs.to(device, non_blocking=True)
    t = t.to(device, non_blocking=True)
    loss, _, _ = model(imgs_blur, imgs, t, mask_ratio=mask_ratio)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise RuntimeError(f"Loss is {loss_value}, stopping training")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss_value

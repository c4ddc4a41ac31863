"""MoCo v3 for ViTs (Chen, Xie & He, ICCV 2021): the "MoCo v3, US" row of Table 2, on the same encoder as D²MAE.

Two augmented views x₁, x₂ of every image go through the query encoder f_q (the ViT's CLS output, then a 3-layer
projector and a 2-layer predictor) and through the momentum encoder f_k (the ViT and projector, an exponential moving
average of f_q's). The loss is the symmetrised InfoNCE of the paper's Algorithm 1::

    L = ctr(q₁, k₂) + ctr(q₂, k₁),     ctr(q, k) = CE(q·kᵀ / τ, positives on the diagonal) · 2τ

with the keys of every process gathered as negatives, τ = 0.2, and the momentum m going from 0.99 to 1 along a
half-cosine over training. As the paper's stability trick, the patch projection stays at its random initialisation
(frozen). MLPs follow the public code: Linear (no bias) → BatchNorm → ReLU between layers, a BatchNorm without affine
parameters after the projector's last layer, 4096 hidden and 256 output units.

Augmentation (the public code's two asymmetric BYOL-style pipelines). The geometric part — RandomResizedCrop with
area (0.08, 1) and a flip, drawn independently per view — is done by the data path (``views = 2``); the photometric
part is done here, batched on the device, from parameters drawn by :meth:`MoCoV3.draw`: colour jitter with
brightness 0.4 and contrast 0.4 in random order (p 0.8), Gaussian blur σ ∈ [0.1, 2.0] px at 224 px (scaled with the
image size; p 1.0 for view 1, 0.1 for view 2) and solarisation (p 0 / 0.2). Saturation, hue and RandomGrayscale of
the original do nothing on a one-channel ultrasound image and are left out (also with ``in_chans 3``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from d2mae.method.blur import BlurSchedule, gaussian_blur
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurEncoder
from d2mae.method.objective import Objective

JITTER_P = 0.8
JITTER = 0.4  # brightness and contrast factors ∈ [1 − 0.4, 1 + 0.4]
BLUR_P = (1.0, 0.1)  # per view
BLUR_SIGMA = (0.1, 2.0)  # pixels at 224 px
SOLARIZE_P = (0.0, 0.2)


def mlp(layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's MLP: ``layers`` bias-free Linear layers with BatchNorm + ReLU between them, and a BatchNorm
    without affine parameters after the last one when ``last_bn`` (the projector's, as SimCLR)."""
    modules: list[nn.Module] = []
    for i in range(layers):
        a = in_dim if i == 0 else hidden
        b = out_dim if i == layers - 1 else hidden
        modules.append(nn.Linear(a, b, bias=False))
        if i < layers - 1:
            modules += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            modules.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*modules)


def momentum_at(progress: float, base: float) -> float:
    """The key encoder's momentum after ``progress`` ∈ [0, 1] of training: ``base`` at 0, 1 at the end (cosine)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base)


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's ``x`` [B, D] concatenated [B·W, D] (no gradient: the keys), and this process's rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), dist.get_rank()


class MoCoV3(Objective):
    """The MoCo v3 pre-training model: query encoder + projector + predictor, momentum encoder + projector.

    ``encoder`` is a :class:`DeblurEncoder` without blur (``encoder.*`` weights load into the classifier as every
    other objective's do); its CLS token after the final norm is the feature.
    """

    views = 2
    crop_scale = (0.08, 1.0)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = DeblurEncoder(config)
        self.encoder.patch_embed.proj.requires_grad_(False)  # random patch projection, frozen (Section 4.2)
        self.projector = mlp(3, config.embed_dim, config.moco_mlp_dim, config.moco_dim, last_bn=True)
        self.predictor = mlp(2, config.moco_dim, config.moco_mlp_dim, config.moco_dim, last_bn=False)
        self.momentum_encoder = copy.deepcopy(self.encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in list(self.momentum_encoder.parameters()) + list(self.momentum_projector.parameters()):
            p.requires_grad_(False)

    @property
    def schedule(self) -> BlurSchedule:
        return self.encoder.schedule

    # -- randomness and augmentation ---------------------------------------------------------------------------
    def draw(self, generator: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        """The photometric augmentation of ``n`` samples' two views, on the CPU (each [n, 2])."""
        u = torch.rand(n, 2, 6, generator=generator)  # [n, views, 6] uniforms
        lo, hi = BLUR_SIGMA
        return {
            "jitter": u[..., 0] < JITTER_P,
            "brightness": 1 + JITTER * (2 * u[..., 1] - 1),
            "contrast": 1 + JITTER * (2 * u[..., 2] - 1),
            "contrast_first": u[..., 3] < 0.5,
            "blur_sigma": torch.where(u[..., 4] < torch.tensor(BLUR_P), lo + (hi - lo) * u[..., 5], 0.0),
            "solarize": torch.rand(n, 2, generator=generator) < torch.tensor(SOLARIZE_P),
        }

    def progress_inputs(self, progress: float) -> dict[str, float]:
        """The momentum at this point of training."""
        return {"momentum": momentum_at(progress, self.config.moco_momentum)}

    def augment(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The photometric part of both pipelines on views [B, 2, C, S, S] in [0, 1] (same shape out)."""
        b, v, c, s, _ = x.shape
        x = x.float().reshape(b * v, c, s, s)
        flat = {k: t.reshape(b * v).to(x.device) for k, t in p.items()}
        bright = flat["brightness"].view(-1, 1, 1, 1)
        contrast = flat["contrast"].view(-1, 1, 1, 1)
        first = flat["contrast_first"].view(-1, 1, 1, 1)

        def brightness(z: torch.Tensor) -> torch.Tensor:
            return (z * bright).clamp(0, 1)

        def contrasted(z: torch.Tensor) -> torch.Tensor:  # blend with the image's mean intensity (torchvision)
            mean = z.mean(dim=(1, 2, 3), keepdim=True)
            return (contrast * z + (1 - contrast) * mean).clamp(0, 1)

        jittered = torch.where(first, brightness(contrasted(x)), contrasted(brightness(x)))
        x = torch.where(flat["jitter"].view(-1, 1, 1, 1), jittered, x)
        sigma = flat["blur_sigma"] * (s / 224)  # the same blur relative to the image as at 224 px
        x = gaussian_blur(x, sigma, max_sigma=BLUR_SIGMA[1] * s / 224)
        x = torch.where(flat["solarize"].view(-1, 1, 1, 1) & (x >= 0.5), 1 - x, x)
        return x.reshape(b, v, c, s, s)

    # -- the loss ----------------------------------------------------------------------------------------------
    def _features(self, encoder: DeblurEncoder, x: torch.Tensor) -> torch.Tensor:
        """CLS feature [B, D] of images [B, C, S, S] (no blur: t = 0, no masking)."""
        z, _, _ = encoder(x, torch.zeros(x.shape[0], device=x.device), 0.0)
        return z[:, 0]

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """InfoNCE of queries [B, d] against every process's keys [B·W, d]; positives on this rank's diagonal."""
        q = F.normalize(q.float(), dim=1)
        k, rank = _gather(F.normalize(k.float(), dim=1))
        tau = self.config.moco_temperature
        logits = q @ k.t() / tau  # [B, B·W]
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
        return F.cross_entropy(logits, labels) * (2 * tau)

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """f_k ← m·f_k + (1 − m)·f_q, for the encoder and the projector."""
        for online, target in ((self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(m).add_(po.detach(), alpha=1 - m)

    def loss(self, x1: torch.Tensor, x2: torch.Tensor, momentum: float) -> torch.Tensor:
        """Symmetrised InfoNCE of two augmented views [B, C, S, S]; updates the momentum encoder first."""
        q1 = self.predictor(self.projector(self._features(self.encoder, x1)))  # [B, d]
        q2 = self.predictor(self.projector(self._features(self.encoder, x2)))
        with torch.no_grad():
            self.update_momentum(momentum)
            k1 = self.momentum_projector(self._features(self.momentum_encoder, x1))
            k2 = self.momentum_projector(self._features(self.momentum_encoder, x2))
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)

    def forward(self, x: torch.Tensor, momentum: float | None = None, **params: torch.Tensor
                ) -> tuple[torch.Tensor, None, None]:
        """One pre-training step's loss on crops [B, 2, C, S, S] in [0, 1] (the data path's two views), augmented
        with ``params`` (:meth:`draw`; drawn here when absent). Returns (loss, None, None) as the other objectives'
        (loss, prediction, mask)."""
        if not params:
            params = self.draw(torch.Generator().manual_seed(int(torch.randint(2**62, ()))), x.shape[0])
        m = self.config.moco_momentum if momentum is None else momentum
        views = self.augment(x, params)  # [B, 2, C, S, S]
        return self.loss(views[:, 0], views[:, 1], m), None, None

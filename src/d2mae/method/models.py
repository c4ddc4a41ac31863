"""DeblurMAE (Section 2.2, Eqs. 1-3) and the classifier that reuses its encoder (Section 2.3, Algorithm 1).

Layout follows the MAE reference implementation: one class, one method per step, a shape comment on each tensor.
The encoder input sequence is Eq. 2::

    z_0 = [CLS, BLU(t), E_1, …, E_N] + P,      P ∈ R^{(N+2)×D}

with BLU(t) = b + sin-emb(t): a learnable D-vector ``b`` plus DDPM's fixed sinusoidal embedding of the blur level t
(so the ``token`` mode adds exactly D parameters). Table 3b's other two modes: ``add`` (sin-emb(t) added to every
patch embedding; no extra token, N+1 positions) and ``none``. The model takes images in [0, 1], blurs them itself
at σ_t (:func:`d2mae.method.blur.gaussian_blur`), normalises them with the data set's own mean/std, and is trained to
predict the *original* normalised image (Eq. 3) — over all patches by default, so the same loss serves OBS at mask
ratio 0 (Eq. 4).
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from d2mae.method.blur import BlurSchedule, gaussian_blur, sinusoidal_embedding
from d2mae.method.model_config import DROP_PATH, ModelConfig, default_stats
from d2mae.method.objective import Objective
from d2mae.runtime.errors import D2maeError

# MAE's and timm's ViT LayerNorm (eps 1e-6): official MAE weights import, and exports to timm match exactly.
LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)


def sincos_pos_embed_2d(dim: int, grid: int, prefix: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings [1, prefix + grid², dim], zeros for the prefix tokens (as MAE)."""
    if dim % 4:
        raise ValueError(f"embedding width {dim} must be divisible by 4 for 2-D sin-cos position embeddings")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))  # [D/4]
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # MAE: first half from w (x), second from h (y)

    def emb_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None, :]  # [grid², D/4]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [grid², D/2]

    emb = torch.cat([emb_1d(gx), emb_1d(gy)], dim=1)  # [grid², D]
    emb = torch.cat([torch.zeros(prefix, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()[None]


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """Images [B, C, H, W] → patches [B, N, p*p*C], row by row, each patch's pixels channel fastest (MAE's order)."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def _init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class DeblurEncoder(nn.Module):
    """ViT encoder with blur conditioning: blur at σ_t → normalise → patches → mask → [CLS, BLU(t), …] + P → blocks.

    Args:
        config: the architecture, blur schedule and normalisation.
        drop_path_rate: stochastic depth (fine-tuning).
        learn_pos_embed: ``False`` in pre-training (fixed sin-cos, as MAE); ``True`` when fine-tuning.
        final_norm: end with a LayerNorm over every token (pre-training, as MAE); ``False`` for the classifier,
            which pools first and normalises the pooled features instead (MAE's global pooling).
    """

    def __init__(self, config: ModelConfig, drop_path_rate: float = 0.0, learn_pos_embed: bool = False,
                 final_norm: bool = True) -> None:
        super().__init__()
        self.config = config
        self.schedule = config.schedule
        dim, prefix = config.embed_dim, config.num_prefix_tokens
        self.num_prefix_tokens = prefix
        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blur_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.blur_embed == "token" else None
        pos = sincos_pos_embed_2d(dim, config.img_size // config.patch_size, prefix)  # [1, prefix + N, D]
        if learn_pos_embed:
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos)
        dpr = torch.linspace(0, drop_path_rate, config.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, qkv_bias=True, norm_layer=LAYER_NORM, drop_path=dpr[i])
            for i in range(config.depth))
        self.norm = LAYER_NORM(dim) if final_norm else nn.Identity()
        default_mean, default_std = default_stats(config.in_chans)
        mean = config.mean if config.mean is not None else default_mean
        std = config.std if config.std is not None else default_std
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self._init()

    def _init(self) -> None:
        self.apply(_init_weights)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if self.blur_token is not None:
            nn.init.normal_(self.blur_token, std=0.02)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels → the data set's standardised intensities."""
        return (x - self.pixel_mean) / self.pixel_std

    def blur(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 1: x_b = G_{σ_t}(x), each sample at its own level; then normalised. [B, C, H, W]."""
        if not self.schedule.enabled:  # MAE: σ_0 for every image
            return self.normalize(x.float())
        return self.normalize(gaussian_blur(x, self.schedule.sigma(t), max_sigma=self.schedule.sigmas[-1]))

    def blur_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """The fixed sinusoidal part of BLU(t), [B, D]."""
        return sinusoidal_embedding(t, self.config.embed_dim)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by argsort of uniform noise (MAE).

        Args:
            x: patch tokens [B, N, D].
            noise: uniform noise [B, N] that decides the mask (the smallest are kept); ``None`` draws it with
                ``torch.rand``. Pre-training passes its own, for masks that are reproducible across resumes and ranks.

        Returns:
            kept tokens [B, N_keep, D]; mask [B, N] (0 is keep, 1 is remove); ids_restore [B, N].
        """
        b, n, d = x.shape
        keep = int(n * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(b, n, device=x.device)  # [B, N]
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [B, N_keep, D]
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # [B, N]
        return x_kept, mask, ids_restore

    def embed(self, x: torch.Tensor, t: torch.Tensor, mask_ratio: float = 0.0, noise: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input sequence of Eq. 2 for images ``x`` [B, C, H, W] in [0, 1] at blur levels ``t`` [B]: blurred
        at σ_t, patches masked (``noise`` [B, N]: see random_masking), [CLS, BLU(t), …] + P.

        Returns:
            z_0 [B, prefix + N_keep, D]; mask [B, N]; ids_restore [B, N].
        """
        prefix = self.num_prefix_tokens
        tokens = self.patch_embed(self.blur(x, t))  # [B, N, D]
        tokens = tokens + self.pos_embed[:, prefix:]
        if self.config.blur_embed == "add":
            tokens = tokens + self.blur_embedding(t)[:, None].to(tokens.dtype)
        b, n, _ = tokens.shape
        if mask_ratio > 0:
            tokens, mask, ids_restore = self.random_masking(tokens, mask_ratio, noise)
        else:
            mask = torch.zeros(b, n, device=x.device)
            ids_restore = torch.arange(n, device=x.device).expand(b, n)
        head = [(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)]  # [B, 1, D]
        if self.blur_token is not None:  # BLU(t), right after CLS (Eq. 2)
            blu = self.blur_token + self.blur_embedding(t)[:, None] + self.pos_embed[:, 1:2]  # [B, 1, D]
            head.append(blu.to(tokens.dtype))
        z = torch.cat(head + [tokens], dim=1)  # [B, prefix + N_keep, D]
        return z, mask, ids_restore

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask_ratio: float = 0.0, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode images ``x`` [B, C, H, W] in [0, 1] at blur levels ``t`` [B] (``noise`` [B, N]: see random_masking).

        Returns:
            latent [B, prefix + N_keep, D]; mask [B, N]; ids_restore [B, N].
        """
        z, mask, ids_restore = self.embed(x, t, mask_ratio, noise)
        for block in self.blocks:
            z = block(z)
        return self.norm(z), mask, ids_restore


class DeblurMAE(Objective):

    """The D²MAE pre-training model: :class:`DeblurEncoder` + MAE decoder that predicts the un-blurred image."""
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = DeblurEncoder(config)
        dim, ddim, prefix = config.embed_dim, config.decoder_embed_dim, config.num_prefix_tokens
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        grid = config.img_size // config.patch_size
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(ddim, grid, prefix))
        self.decoder_blocks = nn.ModuleList(
            Block(ddim, config.decoder_num_heads, config.mlp_ratio, qkv_bias=True, norm_layer=LAYER_NORM)
            for _ in range(config.decoder_depth))
        self.decoder_norm = LAYER_NORM(ddim)
        self.decoder_pred = nn.Linear(ddim, config.patch_size ** 2 * config.in_chans)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def schedule(self) -> BlurSchedule:
        return self.encoder.schedule

    def draw(self, generator: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        """One step's randomness for ``n`` samples (a global batch), on the CPU: blur levels t ~ U{1..T} [n]
        (zeros without blur) and the mask noise [n, N] (:meth:`DeblurEncoder.random_masking`)."""
        t = self.schedule.sample(n, generator=generator)  # [n]
        noise = torch.rand(n, self.config.num_patches, generator=generator)  # [n, N]
        return {"t": t, "noise": noise}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] → [B, N, p*p*C]."""
        return patchify(imgs, self.config.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] → [B, C, H, W]."""
        p, c = self.config.patch_size, self.config.in_chans
        g = int(math.isqrt(x.shape[1]))
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent [B, prefix + N_keep, D] → prediction [B, N, p*p*C] for every patch."""
        prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)  # [B, prefix + N_keep, Dd]
        b, n = ids_restore.shape
        masks = self.mask_token.to(x.dtype).expand(b, n + prefix - x.shape[1], -1)
        patches = torch.cat([x[:, prefix:], masks], dim=1)  # [B, N, Dd] in shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos_embed  # [B, prefix + N, Dd]
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix:]  # [B, N, p*p*C]

    def to_image(self, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A prediction [B, N, p*p*C] as an image [B, C, H, W] in [0, 1]: undoes the per-patch normalisation of
        ``norm_pix_loss`` (with the original ``x``'s patch statistics) and the data set's mean/std."""
        pred = pred.float()
        if self.config.norm_pix_loss:
            target = self.patchify(self.encoder.normalize(x.float()))  # [B, N, p*p*C]
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        enc = self.encoder
        return (self.unpatchify(pred) * enc.pixel_std + enc.pixel_mean).clamp(0, 1)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction target: the *original* (un-blurred) normalised image as patches [B, N, p*p*C]."""
        target = self.patchify(self.encoder.normalize(x.float()))
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def loss_per_sample(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 3 per image: mean squared error [B] over all patches, or over masked ones when ``mask`` is given."""
        err = ((pred.float() - self.target(x)) ** 2).mean(dim=-1)  # [B, N], mean loss per patch
        if mask is None:
            return err.mean(dim=1)
        return (err * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, mask_ratio: float | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pre-training step's forward pass.

        Args:
            x: original images [B, C, H, W] in [0, 1].
            t: blur levels [B]; ``None`` samples t ~ U{1..T} (Section 2.2).
            mask_ratio: share of patches to mask; ``None`` uses the config's (0.75).
            noise: uniform noise [B, N] that decides the mask (``None``: drawn with ``torch.rand``).

        Returns:
            loss (scalar), prediction [B, N, p*p*C], mask [B, N] (1 = masked).
        """
        if t is None:
            t = self.schedule.sample(x.shape[0], device=x.device)
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.encoder(x, t, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        masked_only = self.config.loss_on == "masked" and ratio > 0
        loss = self.loss_per_sample(x, pred, mask if masked_only else None).mean()
        return loss, pred, mask

    @torch.no_grad()
    def deblur_loss(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 4-5's L_deblur^(t): per-image MSE [B] of P_θ(x_b^(t), t, mask ratio 0) against the original."""
        latent, _, ids_restore = self.encoder(x, t, 0.0)
        return self.loss_per_sample(x, self.forward_decoder(latent, ids_restore))

    def restore(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 4's x̂^(t) = P_θ(x_b^(t), t, mask ratio 0) as an image [B, C, H, W] in [0, 1], and its
        L_deblur^(t) [B]: the computation of :meth:`deblur_loss`, with the restoration kept (the viewer's)."""
        latent, _, ids_restore = self.encoder(x, t, 0.0)
        pred = self.forward_decoder(latent, ids_restore)  # [B, N, p*p*C]
        return self.to_image(pred, x), self.loss_per_sample(x, pred)


def load_encoder_weights(encoder: DeblurEncoder, mae_state: dict[str, torch.Tensor], what: str) -> None:
    """Copy a pre-trained model's encoder weights (``encoder.*`` keys but the final norm, which a downstream model
    does not use: it pools or decodes the last block's tokens) into ``encoder``; all must match. A position embedding
    of another patch grid (a downstream model at another image size) is interpolated to ``encoder``'s grid (timm's
    ``resample_abs_pos_embed``, bicubic; the CLS and blur tokens' rows kept), with a warning that says so."""
    enc = {k[len("encoder."):]: v for k, v in mae_state.items()
           if k.startswith("encoder.") and not k.startswith("encoder.norm.")}
    pos, want = enc.get("pos_embed"), encoder.pos_embed
    if pos is not None and pos.shape != want.shape:
        prefix = encoder.num_prefix_tokens
        old, new = int(round((pos.shape[1] - prefix) ** 0.5)), int(round((want.shape[1] - prefix) ** 0.5))
        enc["pos_embed"] = resample_abs_pos_embed(pos, [new, new], [old, old], num_prefix_tokens=prefix)
        warnings.warn(f"the pre-trained position embedding ({old}×{old} patches) was interpolated to {what}'s "
                      f"{new}×{new} grid", stacklevel=2)
    missing, unexpected = encoder.load_state_dict(enc, strict=False)
    if missing or unexpected:
        raise D2maeError(f"pre-trained weights do not match {what} "
                         f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")


class DeblurClassifier(nn.Module):
    """Algorithm 1's f_θ: the pre-trained encoder (blur conditioning included) + average pooling + a linear head.

    ``forward(x, t)`` blurs ``x`` at σ_t itself and feeds t to the blur token, as in lines 11-12 of Algorithm 1.
    Pooling follows MAE's fine-tuning with global pooling (and timm's ``global_pool="avg"``): the patch tokens of the
    last block are averaged and normalised by ``fc_norm``; the encoder's final LayerNorm is not used (its
    pre-trained weights are not loaded). Layer-wise lr decay (timm ``param_groups_layer_decay``) puts CLS, BLU,
    position and patch embeddings in the stem.
    """
    def __init__(self, config: ModelConfig, num_classes: int, drop_path_rate: float = DROP_PATH) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.encoder = DeblurEncoder(config, drop_path_rate=drop_path_rate, learn_pos_embed=True, final_norm=False)
        self.fc_norm = LAYER_NORM(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, num_classes)
        trunc_normal_(self.head.weight, std=2e-5)  # MAE fine-tuning
        nn.init.zeros_(self.head.bias)

    @property
    def schedule(self) -> BlurSchedule:
        return self.encoder.schedule

    def load_encoder(self, mae_state: dict[str, torch.Tensor]) -> None:
        """Copy the encoder weights from a DeblurMAE state dict (:func:`load_encoder_weights`)."""
        load_encoder_weights(self.encoder, mae_state, "the classifier's encoder")

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, D] of images ``x`` [B, C, H, W] in [0, 1] blurred at levels ``t`` [B]."""
        z, _, _ = self.encoder(x, t, 0.0)  # [B, prefix + N, D]
        return self.fc_norm(z[:, self.encoder.num_prefix_tokens:].mean(dim=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.head(self.features(x, t))

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm layer grouping: stem (embeddings, CLS, BLU), one group per block, then fc_norm and the head (lr
        scale 1, as MAE's ``get_layer_id_for_vit``)."""
        return dict(
            stem=r"^encoder\.(?:cls_token|blur_token|pos_embed|patch_embed)",
            blocks=[(r"^encoder\.blocks\.(\d+)", None)],
        )

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.blur_token", "encoder.pos_embed"}


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that normalises a training batch with the statistics of the global batch of all DDP ranks.

    The linear probe's BatchNorm before the head: its input (the frozen encoder's features) needs no gradient, so
    the batch mean and variance are constants for autograd, and two all-reduces of [D] sums give exactly what one
    process with the whole batch computes; the running statistics stay the same on every rank. In one process, and
    in eval mode, it is plain BatchNorm1d (same state-dict keys).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.requires_grad:
            raise RuntimeError("GlobalBatchNorm1d treats the batch statistics as constants; its input must not "
                               "require a gradient (a frozen encoder)")
        xf = x.float()  # [B, D], this rank's part of the global batch
        sums = torch.cat([xf.sum(dim=0), xf.new_tensor([xf.shape[0]])])  # [D + 1]: Σx and the count
        dist.all_reduce(sums)
        n = sums[-1]
        mean = sums[:-1] / n  # [D] over the global batch
        var = ((xf - mean) ** 2).sum(dim=0)  # [D]
        dist.all_reduce(var)
        var /= n  # biased, for normalising (as BatchNorm)
        with torch.no_grad():
            self.num_batches_tracked += 1
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean, factor)
            self.running_var.lerp_(var * n / (n - 1), factor)  # unbiased, as BatchNorm's running estimate
        return F.batch_norm(xf, mean, var, self.weight, self.bias, False, 0.0, self.eps).to(x.dtype)


def build_classifier(config: ModelConfig, num_classes: int, mode: str = "full", drop_path: float = DROP_PATH
                     ) -> DeblurClassifier:
    """The classifier of a fine-tuning mode (weights not loaded). ``linear`` puts a BatchNorm without affine
    parameters before the head and freezes everything but the head (MAE linear probing)."""
    model = DeblurClassifier(config, num_classes, drop_path_rate=0.0 if mode == "linear" else drop_path)
    if mode == "linear":
        head = model.head
        nn.init.trunc_normal_(head.weight, std=0.01)  # MAE linear probing
        model.head = nn.Sequential(GlobalBatchNorm1d(head.in_features, affine=False, eps=1e-6), head)
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    return model


def freeze_all_but_last_blocks(model: DeblurClassifier, n: int) -> DeblurClassifier:
    """Partial fine-tuning (MAE, He et al. 2022, Fig. 9): only the last ``n`` encoder blocks, ``fc_norm`` and the
    head keep ``requires_grad``; the stem (patch, position, CLS and BLU embeddings) and the other blocks are frozen.
    ``n = 0`` trains the head alone (on LayerNorm-ed pooled features)."""
    depth = len(model.encoder.blocks)
    if n > depth:
        raise D2maeError(f"the encoder has {depth} blocks; cannot train the last {n}", option="trainable_blocks")
    for p in model.encoder.parameters():
        p.requires_grad = False
    for block in list(model.encoder.blocks)[depth - n:]:
        for p in block.parameters():
            p.requires_grad = True
    return model

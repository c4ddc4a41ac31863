"""What a masked autoencoder does to one batch, as images (Eqs. 1-3): the input blurred at σ_t, the masked input,
the reconstruction x̂ and, as MAE's figures show it, the visible input with x̂ pasted into the masked patches."""

from __future__ import annotations

import torch

from d2mae.method.blur import gaussian_blur
from d2mae.method.models import DeblurMAE


@torch.no_grad()
def masked_reconstruction(model: DeblurMAE, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
                          ) -> dict[str, torch.Tensor]:
    """``x`` [B, C, S, S] in [0, 1] at blur levels ``t`` [B], masked by ``noise`` [B, N] at the model's mask ratio.

    Returns ``blurred`` (x_b = G_σt(x), Eq. 1), ``masked`` (x_b with the masked patches NaN), ``reconstruction``
    (x̂, the decoder's image; its target is x, Eq. 3) and ``pasted`` (x_b visible, x̂ in the masked patches), each
    [B, C, S, S].
    """
    cfg = model.config
    latent, mask, ids_restore = model.encoder(x, t, cfg.mask_ratio, noise=noise)  # mask [B, N], 1 = removed
    recon = model.to_image(model.forward_decoder(latent, ids_restore), x)  # [B, C, S, S] in [0, 1]
    blurred = gaussian_blur(x, model.schedule.sigma(t)).clamp(0, 1)  # [B, C, S, S]
    b, grid, p = x.shape[0], cfg.img_size // cfg.patch_size, cfg.patch_size
    pix = mask.reshape(b, 1, grid, grid).repeat_interleave(p, 2).repeat_interleave(p, 3)  # [B, 1, S, S]
    hidden = pix.expand_as(blurred) > 0  # [B, C, S, S] True where a patch was masked
    masked = blurred.clone()
    masked[hidden] = float("nan")
    return {"blurred": blurred, "masked": masked, "reconstruction": recon,
            "pasted": torch.where(hidden, recon, blurred)}

"""The pre-training methods of Tables 2 and 3 as :class:`~d2mae.method.model_config.ModelConfig` overrides: one home for
every method's settings (the D²MAE schedule, DeblurrMAE's fixed σ, MAE's masked-patch loss, the ablations)."""

from __future__ import annotations

from typing import Any

from d2mae.method.blur import BlurSchedule
from d2mae.runtime.errors import D2maeError

DEBLURRMAE_SIGMA = 1.1  # DeblurrMAE's one fixed blur, as its public code (pre-training and fine-tuning)


# Table 2 (MAE, DeblurrMAE, D²MAE) and Table 3 (a: blur range, b: blur embedding) as ModelConfig overrides.
_D2MAE = dict(blur=True, sigma_start=BlurSchedule.start, sigma_stop=BlurSchedule.stop, sigma_step=BlurSchedule.step,
              blur_embed="token", loss_on="all")


PRESETS: dict[str, dict[str, Any]] = {
    # D²MAE: σ ∈ {0.1, 0.2, …, 1.1} (T = 11), t ~ U{1..T}, BLU(t) token after CLS, loss on every patch (Eq. 3).
    "d2mae": dict(_D2MAE),
    # MAE: no blur, no blur embedding, loss on the masked patches only.
    "mae": dict(blur=False, blur_embed="none", loss_on="masked"),
    # DeblurrMAE: one fixed blur, no blur embedding, loss on every patch.
    "deblurrmae": dict(blur=True, sigma_start=DEBLURRMAE_SIGMA, sigma_stop=DEBLURRMAE_SIGMA,
                       sigma_step=BlurSchedule.step, blur_embed="none", loss_on="all"),
    # Table 3a: blur ranges 0.1→0.6 and 0.1→1.6 (step 0.1).
    "range-0.6": {**_D2MAE, "sigma_stop": 0.6},
    "range-1.6": {**_D2MAE, "sigma_stop": 1.6},
    # Table 3b: no blur embedding / the sinusoid added to every patch embedding.
    "embed-none": {**_D2MAE, "blur_embed": "none"},
    "embed-add": {**_D2MAE, "blur_embed": "add"},
    # Table 2's other self-supervised rows on ultrasound: MoCo v3 (weight decay 0.1 as its ViT recipe) and DiffMAE.
    "moco-v3": dict(objective="moco-v3", blur=False, blur_embed="none", loss_on="all", weight_decay=0.1),
    "diffmae": dict(objective="diffmae", blur=False, blur_embed="none", loss_on="masked"),
}


def preset_overrides(name: str) -> dict[str, Any]:
    """The ModelConfig overrides of a preset (a copy); unknown names are a clear error."""
    if name not in PRESETS:
        raise D2maeError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}", option="preset")
    return dict(PRESETS[name])


#: The name of each Table 2 method in reports; the ablations are named by their preset.
PRESET_TITLES = {"mae": "MAE", "deblurrmae": "DeblurrMAE", "d2mae": "D²MAE", "moco-v3": "MoCo v3",
                 "diffmae": "DiffMAE"}


def describe_preset(name: str) -> str:
    """A preset in words, from its settings: ``MAE (no blur)``, ``DeblurrMAE (σ = 1.1)``, ``D²MAE (σ 0.1→1.1)``."""
    p = preset_overrides(name)
    title = PRESET_TITLES.get(name, name)
    if p.get("objective", "mae") != "mae":
        return title
    if not p["blur"]:
        return f"{title} (no blur)"
    if p["sigma_start"] == p["sigma_stop"]:
        return f"{title} (σ = {p['sigma_start']:g})"
    embed = {"none": ", no blur embedding", "add": ", blur embedding added"}.get(p.get("blur_embed", "token"), "")
    return f"{title} (σ {p['sigma_start']:g}→{p['sigma_stop']:g}{embed})"

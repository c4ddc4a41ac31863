"""How much softer (or sharper) a view of an image is than a reference view: its equivalent Gaussian σ in pixels.

D²MAE's signal is a blur of σ = 0.1 … 1.1 output pixels (Eq. 1), so every resampling in the data path must be
measured against the same yardstick. :func:`equivalent_sigma` fits the Gaussian that turns the reference into the
view::

    σ* = argmin_σ ‖G_σ(reference) − view‖²        (σ > 0: the view is blurrier)
    σ* = −argmin_σ ‖reference − G_σ(view)‖²       (reported negative: the view is sharper)

whichever fits better. G_σ is the *continuous* Gaussian, applied in the frequency domain (``exp(−2π²σ²f²)``, with
symmetric padding at the borders), so that values well below a pixel resolve: a sampled kernel cut at 4σ (scipy's,
and d2mae's blur levels) is the identity for σ < 0.125 and under-blurs up to σ ≈ 0.5. A few border pixels are left
out of the comparison. The reference of d2mae's data paths is PIL's antialiased bicubic crop-and-resize of the
original file (:func:`d2mae.data.dataset.resize_box`), the same box as the view.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

MAX_SIGMA = 4.0  # pixels: the widest blur the fit considers


def _planes(image: Any) -> np.ndarray:
    """An image [H, W] or [..., H, W] (NumPy or torch) as float64 planes [P, H, W]."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    a = np.asarray(image, dtype=np.float64)
    if a.ndim < 2:
        raise ValueError(f"expected an image [H, W] or [..., H, W], got shape {a.shape}")
    return a.reshape(-1, *a.shape[-2:])


class _Blurrer:
    """Continuous Gaussian blurs of one stack of planes, its padded spectrum computed once."""

    def __init__(self, planes: np.ndarray, pad: int) -> None:
        self.pad = pad
        padded = np.pad(planes, ((0, 0), (pad, pad), (pad, pad)), mode="symmetric")  # [P, H + 2p, W + 2p]
        self.shape = padded.shape[-2:]
        self.spectrum = np.fft.rfft2(padded)
        fy = np.fft.fftfreq(self.shape[0])[:, None]
        fx = np.fft.rfftfreq(self.shape[1])[None, :]
        self.f2 = fy ** 2 + fx ** 2  # cycles per pixel, squared

    def __call__(self, sigma: float) -> np.ndarray:
        out = np.fft.irfft2(self.spectrum * np.exp(-2.0 * np.pi ** 2 * sigma ** 2 * self.f2), s=self.shape)
        p = self.pad
        return out[:, p:-p, p:-p]


def equivalent_sigma(view: Any, reference: Any, border: int = 4) -> float:
    """The signed σ (pixels) of the Gaussian blur that best maps ``reference`` onto ``view`` (module docstring).

    Args:
        view: the image to judge, [H, W] or [C, H, W] (NumPy or torch).
        reference: the same content as the reference view, same shape.
        border: pixels left out at each edge of the comparison.

    Returns:
        σ ≥ 0 when the view is softer, < 0 when it is sharper; 0 for identical images.
    """
    v, r = _planes(view), _planes(reference)
    if v.shape != r.shape:
        raise ValueError(f"view {v.shape} and reference {r.shape} must have the same shape")
    inner = (slice(None), slice(border, v.shape[1] - border or None), slice(border, v.shape[2] - border or None))
    pad = int(np.ceil(4 * MAX_SIGMA))
    blur_ref, blur_view = _Blurrer(r, pad), _Blurrer(v, pad)

    def softer(s: float) -> float:
        return float(np.mean((blur_ref(s) - v)[inner] ** 2))

    def sharper(s: float) -> float:
        return float(np.mean((r - blur_view(s))[inner] ** 2))

    base = softer(0.0)
    if base == 0.0:
        return 0.0
    fits = []
    for direction, cost in ((1.0, softer), (-1.0, sharper)):
        res = minimize_scalar(cost, bounds=(0.0, MAX_SIGMA), method="bounded", options={"xatol": 1e-4})
        fits.append((float(res.fun), direction * float(res.x)))
    best_cost, sigma = min(fits)
    return sigma if best_cost < base else 0.0

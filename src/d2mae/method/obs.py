"""Optimal blurriness search (OBS), the rule (Section 2.3, Eqs. 4-5, Algorithm 1 lines 4-10).

For an image x and each searched level t ∈ {1, 1+s, 1+2s, …, T}, the pre-trained D²MAE deblurs x_b^(t) = G_{σ_t}(x)
with mask ratio 0 and condition t::

    x̂^(t) = P_θ(x_b^(t), t, mask ratio = 0)                        (Eq. 4)
    t*     = argmin_t ‖x̂^(t) − x‖²,   σ_optimal = σ_{t*}           (Eq. 5; ties go to the smaller t)

:class:`ObsSpec` is the one rule that turns a setting into each image's level t: ``search`` (the full OBS, step s),
``none`` (no blur, t = 0) or ``fixed:SIGMA`` (one σ for every image, t = the schedule's level of σ) — Table 3c; the
step is Table 3d. Only t reaches the model; σ = σ_t is derived from the schedule wherever it is shown.
:func:`search_losses` evaluates every searched level of a batch of images in one forward pass and
:func:`select_level` takes the argmin. This module does no I/O: running OBS over a data set is
:func:`d2mae.eval.obs.run_obs`, its table :class:`d2mae.io.obs_table.ObsTable`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from d2mae.method.blur import BlurSchedule
from d2mae.method.models import DeblurMAE
from d2mae.runtime.errors import D2maeError, shown
from d2mae.runtime.options import saved_value

DEFAULT_SEARCH_STEP = 2  # the paper's s (Section 3.1, Table 3d)
OBS_MODES = ("search", "none", "fixed")


@dataclass(frozen=True)
class ObsSpec:
    """What OBS does: ``search`` (Eq. 5, step ``search_step``), ``none`` (no blur, t = 0) or ``fixed`` (one σ).

    Written as text (``search``, ``none``, ``fixed:0.5``; :meth:`parse`) on the command line and stored as
    :meth:`to_dict` in OBS tables and fine-tuned model folders (:meth:`from_dict`).
    """

    mode: str = "search"
    search_step: int = DEFAULT_SEARCH_STEP
    sigma: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in OBS_MODES:
            raise D2maeError(f"unknown setting '{self.mode}'; use search, none or fixed:SIGMA (e.g. fixed:0.5)",
                             option="obs")
        if isinstance(self.search_step, bool) or not isinstance(self.search_step, int) or self.search_step < 1:
            raise D2maeError(f"must be an integer ≥ 1, got {shown(self.search_step)}", option="search_step")
        if self.mode == "fixed" and (self.sigma is None or not math.isfinite(self.sigma) or self.sigma < 0):
            raise D2maeError(f"fixed needs a σ ≥ 0, e.g. fixed:0.5 (got {shown(self.sigma)})", option="obs")

    @classmethod
    def parse(cls, text: str, search_step: int = DEFAULT_SEARCH_STEP) -> "ObsSpec":
        """``"search"`` / ``"none"`` / ``"fixed:0.5"`` -> an :class:`ObsSpec` (the ``--obs`` option)."""
        word = str(text).strip().lower()
        if word.startswith("fixed:"):
            try:
                sigma = float(word.split(":", 1)[1])
            except ValueError:
                sigma = float("nan")
            return cls("fixed", search_step, sigma)
        if word.startswith("fixed"):
            return cls("fixed", search_step, None)
        return cls(word, search_step)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config.json") -> "ObsSpec":
        """The stored form (:meth:`to_dict`) back; ``None`` or ``{}`` is ``none`` (a model fine-tuned without OBS).

        Raises:
            D2maeError: a stored form that is not one (``obs: "search"``), naming ``source``.
        """
        if not isinstance(data, dict):
            if data not in (None, {}):
                raise D2maeError(f"{source}: 'obs' must be a mapping (mode, search_step, sigma), got {data!r}; the "
                                 "file is damaged — write it again with d2mae")
            data = {"mode": "none"}
        mode = saved_value(data, "mode", str, f"{source} (obs)", "none", choices=OBS_MODES)
        step = saved_value(data, "search_step", int, f"{source} (obs)", DEFAULT_SEARCH_STEP, low=1)
        sigma = saved_value(data, "sigma", float, f"{source} (obs)", None, low=0.0)
        if mode == "fixed" and sigma is None:
            raise D2maeError(f"{source}: a fixed OBS setting needs its 'sigma'; the file is damaged")
        return cls(mode, step, sigma)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "search_step": self.search_step if self.mode == "search" else None,
                "sigma": self.sigma}

    def text(self) -> str:
        """The ``--obs`` value that gives this spec back (with its ``--search-step``)."""
        return f"fixed:{self.sigma:g}" if self.mode == "fixed" else self.mode

    def describe(self) -> str:
        if self.mode == "search":
            return f"search (s = {self.search_step})"
        return "none (no blur)" if self.mode == "none" else f"fixed σ = {self.sigma:g}"

    def levels(self, schedule: BlurSchedule) -> list[int]:
        """The levels the search visits: t = 1, 1+s, 1+2s, … ≤ T (Algorithm 1 line 4); ``[0]`` without blur."""
        return schedule.search_levels(self.search_step)

    def fixed_level(self, schedule: BlurSchedule) -> float | None:
        """Every image's t when the setting fixes it: 0 for ``none``, the level of σ for ``fixed`` (between grid
        levels when σ is); ``None`` for ``search``, whose t* comes from the search."""
        if self.mode == "none":
            return 0.0
        if self.mode == "fixed":
            try:
                return schedule.level_of(float(self.sigma))
            except D2maeError as exc:
                raise D2maeError(f"{exc.message}", option="obs") from None
        return None


def search_losses(model: DeblurMAE, x: torch.Tensor, levels: Sequence[int], max_rows: int | None = None
                  ) -> torch.Tensor:
    """L_deblur^(t) for every image and every level, all levels of the batch in one pass (Eq. 4).

    Args:
        model: the pre-trained D²MAE (eval mode).
        x: original images [B, C, H, W] in [0, 1], on the model's device.
        levels: searched levels t (L of them).
        max_rows: at most this many (image, level) pairs per forward pass (``None``: all B·L at once).

    Returns:
        Per-image MSE [B, L] (fp32).
    """
    b, n_levels = x.shape[0], len(levels)
    xr = x.unsqueeze(1).expand(b, n_levels, *x.shape[1:]).reshape(b * n_levels, *x.shape[1:])  # [B·L, C, H, W]
    tr = torch.tensor(list(levels), dtype=torch.float32, device=x.device).repeat(b)  # [B·L], image-major
    rows = b * n_levels if not max_rows else max(1, int(max_rows))
    while True:
        try:
            out = [model.deblur_loss(xr[i:i + rows], tr[i:i + rows]).float() for i in range(0, b * n_levels, rows)]
            return torch.cat(out).view(b, n_levels)  # [B, L]
        except torch.cuda.OutOfMemoryError:
            if rows == 1:
                raise
            rows = max(1, rows // 2)  # chunk smaller when the device runs out of memory
            torch.cuda.empty_cache()


def select_level(losses: torch.Tensor | np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """Eq. 5: t* = argmin over the searched levels, per row of ``losses`` [n, L]; ties go to the smaller t."""
    arr = np.asarray(losses.detach().cpu() if isinstance(losses, torch.Tensor) else losses, dtype=np.float64)
    order = np.argsort(np.asarray(levels))  # np.argmin returns the first minimum: levels in ascending order
    return np.asarray(levels)[order][np.argmin(arr[:, order], axis=1)]

"""Model folders on disk: safetensors weights + a JSON config with a format name and version.

A pre-trained D²MAE folder holds ``model.safetensors`` (the full DeblurMAE: encoder, blur conditioning, decoder)
and ``config.json``::

    {"format": "d2mae-pretrained", "format_version": 1, "model": {...ModelConfig...}, "extra": {...}}

Nothing here unpickles: weights are read with safetensors, configs with ``json``. A folder of an unknown format, a
newer version, or weights that do not match the config is refused with a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from d2mae.errors import D2maeError
from d2mae.models import DeblurMAE, ModelConfig
from d2mae.runtime import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors, atomically (contiguous CPU copies, shared storage broken)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file is a clear error naming it."""
    path = Path(path)
    if not path.is_file():
        raise D2maeError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise D2maeError(f"weights file {path} is not a valid safetensors file ({exc})") from None


def read_config(folder: str | Path, expected_format: str) -> dict[str, Any]:
    """Read and check ``folder/config.json``: right format name, a version this d2mae understands."""
    folder = Path(folder)
    path = folder / CONFIG
    if not folder.is_dir():
        raise D2maeError(f"model folder {folder} does not exist")
    if not path.is_file():
        raise D2maeError(f"model folder {folder} has no {CONFIG}; is it a d2mae model folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise D2maeError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else None
        raise D2maeError(f"{path}: expected a '{expected_format}' folder, found format {found!r}")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise D2maeError(f"{path}: format version {version!r} is not supported by this d2mae "
                         f"(it reads version {FORMAT_VERSION}); upgrade d2mae or re-export the model")
    return data


def check_state_matches(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights whose keys or shapes differ from ``model``'s, naming the first differences."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''}")
        if wrong:
            parts.append(f"shape mismatch {', '.join(wrong[:3])}")
        raise D2maeError(f"{source}: weights do not match the architecture in its config ({'; '.join(parts)})")


def save_pretrained(model: DeblurMAE, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a pre-trained DeblurMAE folder (weights first, then the config that makes it valid)."""
    folder = Path(folder)
    save_weights(model.state_dict(), folder / WEIGHTS, metadata={"format": "d2mae-pretrained"})
    atomic_write_json(folder / CONFIG, {"format": "d2mae-pretrained", "format_version": FORMAT_VERSION,
                                        "model": model.config.to_dict(), "extra": extra or {}})
    return folder


def load_pretrained(folder: str | Path, device: torch.device | str = "cpu") -> DeblurMAE:
    """Load a pre-trained DeblurMAE folder written by :func:`save_pretrained`, in eval mode."""
    folder = Path(folder)
    data = read_config(folder, "d2mae-pretrained")
    config = ModelConfig.from_dict(data.get("model", {}), source=str(folder / CONFIG))
    model = DeblurMAE(config)
    state = load_weights(folder / WEIGHTS)
    check_state_matches(model, state, str(folder))
    model.load_state_dict(state)
    return model.to(device).eval()

"""Model folders on disk: safetensors weights + a JSON config with a format name and version.

A pre-trained folder holds ``model.safetensors`` (the whole pre-training model: for D²MAE the DeblurMAE's encoder,
blur conditioning and decoder; for MoCo v3 and DiffMAE their own heads, :mod:`d2mae.method.objectives`) and
``config.json``::

    {"format": PRETRAINED_FORMAT, "format_version": 1, "model": {...ModelConfig...}, "extra": {...}}

plus, from ``d2mae pretrain``, ``pretrain_hashes.txt`` (the content hash of every pre-training image, for the
fine-tuning leak guard). A fine-tuned model folder (``fold_k/model`` of a fine-tuning run) holds
``classifier.safetensors`` and ``config.json`` (format ``d2mae-classifier``: the model config, the class names, the
OBS setting, the fine-tuning settings, the pre-trained model's sha256) and ``pretrained/``, the pre-trained folder
that OBS on new images needs; for a timm backbone (``d2mae finetune --backbone``) ``model`` is its
:class:`~d2mae.method.backbones.BackboneConfig` and there is no ``pretrained/``.

Nothing here unpickles: weights are read with safetensors, configs with ``json``. A folder of an unknown format, a
newer version, or weights that do not match the config is refused with a clear error.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from d2mae.method.backbones import BackboneConfig, TimmClassifier
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import build_classifier
from d2mae.method.objectives import build_objective
from d2mae.method.obs import ObsSpec
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_bytes, atomic_write_json, check_replaceable, file_sha256, record_written
from d2mae.runtime.options import check_saved_types

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PRETRAINED_FORMAT = "d2mae-pretrained"
CLASSIFIER_FORMAT = "d2mae-classifier"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
PRETRAIN_HASHES = "pretrain_hashes.txt"  # written by d2mae pretrain: the leak guard's list


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors, atomically (contiguous CPU copies, shared storage broken)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def check_finite(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights holding NaN or ±inf, naming the first such tensor (a diverged run or a damaged file would
    otherwise give NaN losses, every OBS level equal, and a fine-tuning that blames its learning rate)."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise D2maeError(f"{source}: tensor {key} holds {bad} NaN or infinite value(s) of {value.numel()}; the "
                             "weights come from a diverged run or a damaged file — use an earlier checkpoint or "
                             "train again")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file, or one with non-finite values, is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise D2maeError(f"weights file {path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise D2maeError(f"weights file {path} is not a valid safetensors file ({exc})") from None
    check_finite(state, path)
    return state


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


def save_pretrained(model: torch.nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a pre-trained folder of any objective (weights first, then the config that makes it valid)."""
    folder = Path(folder)
    save_weights(model.state_dict(), folder / WEIGHTS, metadata={"format": PRETRAINED_FORMAT})
    atomic_write_json(folder / CONFIG, {"format": PRETRAINED_FORMAT, "format_version": FORMAT_VERSION,
                                        "model": model.config.to_dict(), "extra": extra or {}})
    return folder


def load_pretrained(folder: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load a pre-trained folder written by :func:`save_pretrained` (a DeblurMAE, MoCoV3 or DiffMAE), in eval
    mode."""
    folder = Path(folder)
    data = read_config(folder, PRETRAINED_FORMAT)
    config = ModelConfig.from_dict(data.get("model", {}), source=str(folder / CONFIG))
    model = build_objective(config)
    state = load_weights(folder / WEIGHTS)
    check_state_matches(model, state, str(folder))
    model.load_state_dict(state)
    return model.to(device).eval()


def model_sha256(folder: str | Path) -> str:
    """Identity of a pre-trained folder: sha256 of its ``model.safetensors``."""
    path = Path(folder) / "model.safetensors"
    try:
        return file_sha256(path)
    except OSError as exc:
        raise D2maeError(f"cannot read {path}: {exc}") from None


def read_classifier_config(folder: str | Path) -> dict[str, Any]:
    return read_config(folder, CLASSIFIER_FORMAT)


def load_classifier(folder: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Load a fine-tuned model folder (``classifier.safetensors`` + ``config.json``) in eval mode: a
    :class:`~d2mae.method.models.DeblurClassifier`, or a :class:`~d2mae.method.backbones.TimmClassifier`."""
    folder = Path(folder)
    meta = read_classifier_config(folder)
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise D2maeError(f"{folder / 'config.json'}: 'classes' must list the class names")
    saved = meta.get("model", {})
    model: torch.nn.Module
    if isinstance(saved, dict) and "backbone" in saved:  # a timm classifier (d2mae finetune --backbone)
        check_saved_types(BackboneConfig, saved, str(folder / "config.json"))
        try:
            backbone = BackboneConfig(**saved)
        except (TypeError, D2maeError) as exc:
            raise D2maeError(f"{folder / 'config.json'}: {exc}") from None
        model = TimmClassifier(backbone, len(classes), drop_path=0.0)
    else:
        config = ModelConfig.from_dict(saved, source=str(folder / "config.json"))
        mode = (meta.get("finetune") or {}).get("mode", "full")
        model = build_classifier(config, len(classes), mode, drop_path=0.0)
    state = load_weights(folder / CLASSIFIER_WEIGHTS)
    check_state_matches(model, state, str(folder))
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def save_classifier(model: torch.nn.Module, folder: str | Path, classes: Sequence[str], obs: ObsSpec,
                    finetune: dict[str, Any], pretrained: str | Path | None, pretrained_hash: str | None) -> Path:
    """Write a fine-tuned model folder: weights, config.json (with the OBS setting ``obs``), and a copy of the
    pre-trained folder (for OBS on new images)."""
    folder = Path(folder)
    save_weights(model.state_dict(), folder / CLASSIFIER_WEIGHTS, metadata={"format": CLASSIFIER_FORMAT})
    if pretrained is not None:
        target = folder / "pretrained"
        for name in ("model.safetensors", "config.json"):
            link_or_copy(Path(pretrained) / name, target / name)
    atomic_write_json(folder / "config.json", {
        "format": CLASSIFIER_FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(),
        "num_classes": len(classes), "classes": list(classes), "obs": obs.to_dict(), "finetune": finetune,
        "pretrained_sha256": pretrained_hash})
    return folder


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no extra disk for k folds) or copy; atomic either way, and kept to the rule of
    :func:`d2mae.runtime.files.atomic_writer` (never over a path to keep; recorded in its folder's ledger)."""
    check_replaceable(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    record_written(dst)


def pretraining_hashes(folder: str | Path) -> tuple[set[str] | None, str]:
    """Content hashes of the pre-training images, from ``pretrain_hashes.txt`` in a pre-trained folder.

    ``d2mae pretrain`` writes that file (one sha256 per line, then the path); ``(None, "")`` when it is absent.
    """
    path = Path(folder) / PRETRAIN_HASHES
    if path.is_file():
        return _read_hash_file(path), str(path)
    return None, ""


def _read_hash_file(path: Path) -> set[str]:
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split()
        if parts and not parts[0].startswith("#"):
            out.add(parts[0].lower())
    return out

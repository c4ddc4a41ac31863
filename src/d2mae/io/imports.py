"""Initialise D²MAE from ImageNet MAE weights: the official MAE checkpoints and timm's ``vit_*_patch16_224.mae``.

Sources (all read from local files; nothing is downloaded):

- the official MAE release (``mae_pretrain_vit_base.pth`` …): ``{"model": state_dict}`` in MAE's names
  (``cls_token``, ``pos_embed`` [1, 1+N, D], ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``, and, in the full
  pre-training checkpoints, ``mask_token``, ``decoder_embed.*``, ``decoder_pos_embed``, ``decoder_blocks.N.*``,
  ``decoder_norm.*``, ``decoder_pred.*``); fine-tuned checkpoints add ``fc_norm.*`` and ``head.*``;
- timm's MAE weights (``model.safetensors`` of ``vit_base_patch16_224.mae`` …): the same encoder names, no wrapper;
- the official MoCo v3 ViT release (``vit-b-300ep.pth.tar`` …): ``{"state_dict": …}`` with
  ``module.base_encoder.*`` (the query ViT, its projector as ``head.*``), ``module.momentum_encoder.*`` and
  ``module.predictor.*``; only the query ViT is used;
- a d2mae state dict (``encoder.*`` names), e.g. to move a pre-trained model to another image size.

``.pth`` files are read with ``torch.load(weights_only=True)`` only: a file holding pickled Python objects (which
could run code when unpickled) is refused, never executed. The conversion to a :class:`~d2mae.method.models.DeblurMAE` or
:class:`~d2mae.method.models.DeblurClassifier` (Section 2.2, Eq. 2):

- keys gain the ``encoder.`` prefix (decoder keys keep theirs);
- position embeddings gain the blur token's row: ``P`` grows from N + 1 to N + 2 rows, BLU's row is zero like the
  prefix rows of MAE's fixed sin-cos embedding; a fixed 2-D sin-cos grid is regenerated exactly for another image
  size, any other grid is resampled with ``timm.layers.resample_abs_pos_embed`` (bicubic);
- 3-channel ↔ 1-channel: the patch projection is adapted as timm's ``adapt_input_conv`` does (3→1 sums the RGB
  filters, so a gray image x gives the response of the RGB image (x, x, x)); ``decoder_pred`` predicts the gray value
  as the mean of its three RGB predictions per pixel (1→3 repeats the gray row for each channel);
- the blur token itself (and the model's own input mean/std) are new: they keep their initial values.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from d2mae.io.artifacts import check_finite, load_weights, save_pretrained
from d2mae.io.convert import convert_decoder_pred, convert_patch_weight, convert_pos_embed
from d2mae.method.backbones import TimmClassifier
from d2mae.method.model_config import ARCHITECTURES, ModelConfig, default_stats
from d2mae.method.models import DeblurClassifier, DeblurMAE
from d2mae.runtime.errors import D2maeError, reason
from d2mae.runtime.files import file_sha256

# target-model keys that no MAE or timm checkpoint can provide: kept as the model initialised / configured them
NEW_KEYS = ("encoder.blur_token", "encoder.pixel_mean", "encoder.pixel_std")
_ENCODER = re.compile(r"^(cls_token|blur_token|pos_embed|patch_embed\.|blocks\.|norm\.)")
_DECODER = re.compile(r"^(mask_token|decoder_embed\.|decoder_pos_embed|decoder_blocks\.|decoder_norm\.|decoder_pred\.)")
_HEAD = re.compile(r"^(fc_norm\.|head\.)")
_WRAPPERS = ("model", "state_dict", "module", "model_state")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class ImportReport:
    """What :func:`init_from_checkpoint` did, key by key.

    Attributes:
        source: the checkpoint file.
        loaded: model keys now holding checkpoint values.
        missing: model keys a checkpoint of this layout should have provided but did not (kept at init).
        new: model keys no MAE/timm checkpoint has (the blur token, the model's input mean/std): kept at init.
        unexpected: checkpoint keys that were not used.
        converted: one line per conversion (prefix row inserted, grid resized, channels adapted, …).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for a log."""
        parts = [f"initialised from {self.source}: {len(self.loaded)} tensors loaded"]
        if self.new:
            parts.append(f"kept new: {', '.join(self.new)}")
        if self.missing:
            parts.append(f"missing (kept at init): {_short(self.missing)}")
        if self.unexpected:
            parts.append(f"unused from the checkpoint: {_short(self.unexpected)}")
        if self.converted:
            parts.append("; ".join(self.converted))
        return "; ".join(parts)


def _short(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" … ({len(keys)} in all)" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------------------------
# reading the file


def load_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file, or a model folder.

    ``.pth`` files go through ``torch.load(weights_only=True)``: tensors, dicts, lists and numbers only. Wrappers
    ``{"model": …}`` / ``{"state_dict": …}`` are unwrapped and ``module.`` prefixes removed.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "model.pth"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth"))
            if not found:
                raise D2maeError(f"folder {path} holds no .safetensors or .pth weights", option="init_from")
            path = found[0]
    if not path.is_file():
        raise D2maeError(f"checkpoint {path} does not exist", option="init_from")
    if path.suffix == ".safetensors":
        obj: Any = load_weights(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "unsupported global" not in str(exc).lower():  # not a pickle of allowed types: damaged
                raise D2maeError(f"checkpoint {path} is not a readable PyTorch weights file (damaged, or not "
                                 "weights)") from None
            raise D2maeError(
                f"checkpoint {path} holds pickled Python objects, which could run code when loaded, so d2mae refuses "
                "it; save only its tensors (a plain state dict or safetensors) from a trusted session and import "
                "that") from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
            raise D2maeError(f"checkpoint {path} is not a readable PyTorch weights file ({reason(exc)})") from None
    state = _unwrap(obj, path)
    check_finite(state, path)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise D2maeError(f"checkpoint {path} holds no state dict (expected tensors by name, or {{'model': …}})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise D2maeError(f"checkpoint {path} holds no tensors under {', '.join(map(str, list(obj)[:5]))}")
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# tensor conversions


# ---------------------------------------------------------------------------------------------------------------
# mapping a checkpoint onto a model


def _role(key: str) -> str:
    if _ENCODER.match(key):
        return "encoder"
    if _DECODER.match(key):
        return "decoder"
    if _HEAD.match(key):
        return "head"
    return "other"


def checkpoint_layout(state: dict[str, torch.Tensor]) -> str:
    """The release a state dict comes from, by its key names: ``moco-v3`` (``base_encoder.*``, its
    ``module.`` prefix already removed), ``beit`` (BEiT / USFM: ``attn.q_bias``, ``gamma_1``, relative position
    biases), ``d2mae`` (``encoder.*``) or ``mae`` (MAE's and timm's ViT names)."""
    keys = list(state)
    if any(k.startswith("base_encoder.") for k in keys):
        return "moco-v3"
    if any(k.endswith(("attn.q_bias", ".gamma_1", "relative_position_bias_table")) for k in keys):
        return "beit"
    if any(k.startswith("encoder.") for k in keys):
        return "d2mae"
    return "mae"


def _source_names(state: dict[str, torch.Tensor], path: str | Path = "") -> dict[str, torch.Tensor]:
    """Checkpoint keys in MAE's flat names: ``encoder.`` of a d2mae state dict stripped; of a MoCo v3 release only
    the query encoder (``base_encoder.*`` without its projector ``head.*``; the momentum encoder and the predictor
    are not part of the ViT)."""
    layout = checkpoint_layout(state)
    if layout == "beit":
        raise D2maeError(f"checkpoint {path} is in the BEiT layout (relative position biases, layer scales: e.g. USFM), "
                         "which this ViT cannot hold; fine-tune it with the timm backbone it was made for "
                         "(backbone timm:beit_base_patch16_224, as the usfm method does)")
    if layout == "moco-v3":
        return {k[len("base_encoder."):]: v for k, v in state.items()
                if k.startswith("base_encoder.") and not k.startswith("base_encoder.head.")}
    if layout == "d2mae":
        return {(k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in state.items()}
    return dict(state)


def encoder_architecture(path: str | Path) -> dict[str, Any]:
    """The ViT of a checkpoint's encoder as :class:`~d2mae.method.models.ModelConfig` options (``arch`` and, when
    it differs from that architecture's, ``patch_size``), from its tensor shapes; an unknown size is a clear error."""

    source = _source_names(load_checkpoint_file(path), path)
    if "cls_token" not in source or "patch_embed.proj.weight" not in source:
        raise D2maeError(f"checkpoint {path} holds no ViT encoder (no cls_token / patch_embed.proj.weight)")
    dim = int(source["cls_token"].shape[-1])
    depth = 1 + max((int(k.split(".")[1]) for k in source if k.startswith("blocks.")), default=-1)
    patch = int(source["patch_embed.proj.weight"].shape[-1])
    for name, (p, d, blocks, _) in ARCHITECTURES.items():
        if (d, blocks) == (dim, depth):
            return {"arch": name, **({"patch_size": patch} if patch != p else {})}
    known = ", ".join(f"{n} ({d} wide, {b} blocks)" for n, (_, d, b, _) in ARCHITECTURES.items())
    raise D2maeError(f"checkpoint {path} holds a ViT {dim} wide with {depth} blocks; d2mae knows {known}")


def _target_key(model: DeblurMAE | DeblurClassifier, key: str) -> str | None:
    role = _role(key)
    if role == "encoder":
        return "encoder." + key
    if role == "decoder" and isinstance(model, DeblurMAE):
        return key
    if role == "head" and isinstance(model, DeblurClassifier):
        return key
    return None


class _Conversion:
    """What an import plans per role (encoder, decoder, head): the converted tensors, the notes for the report and
    the problems that stop a role from loading."""

    def __init__(self) -> None:
        self.problems: dict[str, list[str]] = {"encoder": [], "decoder": [], "head": []}
        self.planned: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "decoder": {}, "head": {}}
        self.notes: dict[str, list[str]] = {"encoder": [], "decoder": [], "head": []}
        self.failed: set[str] = set()  # model keys whose checkpoint tensor could not be converted


def _plan_tensors(model: DeblurMAE | DeblurClassifier, source: dict[str, torch.Tensor], target: dict[str, Any],
                  c_src: int, report: ImportReport) -> _Conversion:
    """Each checkpoint tensor converted to its place in ``model`` (position embeddings, patch projection, decoder
    head), or listed as unexpected with the reason."""
    conv = _Conversion()
    problems, planned, notes, failed = conv.problems, conv.planned, conv.notes, conv.failed
    cfg = model.config
    for key, value in source.items():
        tkey = _target_key(model, key)
        if isinstance(model, DeblurClassifier) and key.startswith("norm."):
            report.unexpected.append(key)  # MAE's global pooling drops the encoder's final norm
            notes["encoder"].append(f"{key}: not used, the classifier pools first and normalises with fc_norm")
            continue
        if tkey is None or tkey not in target:
            report.unexpected.append(key)
            if key == "blur_token":
                notes["encoder"].append("blur_token: not used, this model has no blur token (--blur-embed)")
            elif _role(key) == "encoder":
                problems["encoder"].append(f"{key} has no place in the model (another depth or layout?)")
            continue
        role = _role(key)
        want = target[tkey]
        try:
            if key in ("pos_embed", "decoder_pos_embed"):
                out = convert_pos_embed(value, want, key, notes[role])
            elif key == "patch_embed.proj.weight":
                out = convert_patch_weight(value, want, notes[role])
            elif key.startswith("decoder_pred."):
                out = convert_decoder_pred(value, want, c_src, cfg.in_chans, key, notes[role])
            else:
                out = value
            if tuple(out.shape) != tuple(want.shape):
                raise ValueError(f"{key}: {tuple(value.shape)} vs the model's {tuple(want.shape)}")
        except ValueError as exc:
            problems[role].append(str(exc))
            report.unexpected.append(key)
            failed.add(tkey)
            continue
        planned[role][tkey] = out.to(want.dtype)

    return conv


def _list_missing(model: DeblurMAE | DeblurClassifier, target: dict[str, Any], conv: _Conversion,
                  report: ImportReport) -> None:
    """The model's tensors the checkpoint does not provide: new ones (the blur token) and missing ones."""
    problems, planned, failed = conv.problems, conv.planned, conv.failed
    expected_roles = {"encoder"} | ({"decoder"} if isinstance(model, DeblurMAE) else set())
    if isinstance(model, DeblurClassifier) and planned["head"]:
        expected_roles.add("head")
    for tkey in target:
        if tkey in NEW_KEYS:
            if tkey == "encoder.blur_token" and tkey in planned["encoder"]:
                continue  # a d2mae checkpoint's own blur token
            report.new.append(tkey)
            continue
        role = "encoder" if tkey.startswith("encoder.") else ("head" if _HEAD.match(tkey) else "decoder")
        if not any(tkey in planned[r] for r in planned) and role in expected_roles:
            report.missing.append(tkey)
            if role == "encoder" and tkey not in failed:
                problems["encoder"].append(f"{tkey} is not in the checkpoint")


def init_from_checkpoint(model: DeblurMAE | DeblurClassifier, path: str | Path, *,
                         strict_encoder: bool = True) -> ImportReport:
    """Initialise ``model`` in place from an MAE / timm / d2mae checkpoint file and say what was used.

    Args:
        model: a :class:`DeblurMAE` (pre-training) or :class:`DeblurClassifier` (fine-tuning).
        path: ``.pth`` (official MAE, ``torch.load(weights_only=True)``), ``.safetensors`` (timm), or a folder.
        strict_encoder: refuse a checkpoint whose encoder does not cover the model's encoder exactly (every
            encoder tensor present and convertible, no extra encoder tensors such as deeper blocks). With ``False``
            those tensors are skipped and listed in the report instead. A decoder that does not fit (other width or
            depth) is never loaded in part: it is skipped whole and reported.

    Returns:
        An :class:`ImportReport` (``report.summary()`` for a log line).
    """
    if not isinstance(model, (DeblurMAE, DeblurClassifier)):
        raise TypeError(f"init_from_checkpoint expects a DeblurMAE or DeblurClassifier, got {type(model).__name__}")
    source = _source_names(load_checkpoint_file(path), path)
    report = ImportReport(source=str(path))
    target = model.state_dict()
    new_state = {k: v.clone() for k, v in target.items()}
    cfg = model.config
    c_src = source["patch_embed.proj.weight"].shape[1] if "patch_embed.proj.weight" in source else cfg.in_chans
    conv = _plan_tensors(model, source, target, c_src, report)
    _list_missing(model, target, conv, report)
    problems, planned, notes = conv.problems, conv.planned, conv.notes
    if strict_encoder and problems["encoder"]:
        first = problems["encoder"][0]
        more = f" (and {len(problems['encoder']) - 1} more)" if len(problems["encoder"]) > 1 else ""
        raise D2maeError(f"checkpoint {path} does not fit this model's encoder ({cfg.arch}, {cfg.img_size}px, "
                         f"{cfg.in_chans} channel(s)): {first}{more}; choose the model options (--arch, --embed-dim, "
                         "--depth, --patch-size) the checkpoint was trained with")
    decoder_missing = any(_DECODER.match(k) for k in report.missing)
    if isinstance(model, DeblurMAE) and not any(_role(k) == "decoder" for k in source):
        notes["decoder"].append("decoder: not in the checkpoint (encoder-only weights), kept at its initialisation")
    if problems["decoder"] or (planned["decoder"] and decoder_missing):
        # a decoder loaded in part is worse than a fresh one: skip it whole
        reason = problems["decoder"][0] if problems["decoder"] else "the checkpoint lacks some of its tensors"
        report.unexpected.extend(k for k in source if _role(k) == "decoder")
        report.missing.extend(planned["decoder"])
        planned["decoder"] = {}
        notes["decoder"] = [f"decoder not loaded, kept at its initialisation: {reason}"]
    notes["head"].extend(f"not loaded: {problem}" for problem in problems["head"])
    notes["encoder"].extend(f"not loaded: {problem}" for problem in problems["encoder"])  # strict_encoder=False
    for role in planned:
        new_state.update(planned[role])
        report.loaded.extend(planned[role])
        report.converted.extend(notes[role])
    model.load_state_dict(new_state, strict=True)
    report.loaded.sort()
    report.missing = sorted(set(report.missing))
    report.unexpected = sorted(set(report.unexpected))
    return report


def _imported_model(path: str | Path, img_size: int, in_chans: int, mean: list[float], std: list[float]
                    ) -> tuple[DeblurMAE, ImportReport]:
    """The MAE-preset DeblurMAE of a released checkpoint's encoder architecture, its weights converted in."""
    config = ModelConfig(**encoder_architecture(path), img_size=img_size, in_chans=in_chans, blur=False,
                         blur_embed="none", loss_on="masked", mean=list(mean), std=list(std))
    model = DeblurMAE(config)
    return model, init_from_checkpoint(model, path)


def check_importable(path: str | Path, img_size: int, in_chans: int) -> None:
    """Raise what :func:`import_pretrained` would raise for this file (unsafe or damaged, no ViT, an encoder that
    does not fit), without writing anything: an experiment checks every method's weights before its first stage."""
    _imported_model(path, img_size, in_chans, *default_stats(in_chans))


def import_pretrained(path: str | Path, folder: str | Path, *, img_size: int, in_chans: int, mean: list[float],
                      std: list[float], seed: int = 0) -> Path:
    """A pre-trained folder from a released checkpoint (MAE, timm MAE, MoCo v3), for fine-tuning from it.

    The model is an MAE-preset :class:`~d2mae.method.models.DeblurMAE` (no blur) with the checkpoint's encoder
    architecture (:func:`encoder_architecture`) at ``img_size`` / ``in_chans`` and the given input mean/std; its
    encoder is converted as :func:`init_from_checkpoint` describes, a decoder the checkpoint lacks stays at its
    seeded initialisation. ``config.json`` records the source file, its sha256 and the import report.
    """

    torch.manual_seed(seed)
    model, report = _imported_model(path, img_size, in_chans, mean, std)
    return save_pretrained(model, folder, extra={
        "pretrain": {"preset": "imported", "images": 0, "seed": seed},
        "imported": {"source": str(Path(path).absolute()), "source_sha256": file_sha256(path),
                     "report": report.to_dict()}})


def backbone_state(path: str | Path, config: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A released checkpoint as a state dict in the names of the timm model of ``config`` (a
    :class:`~d2mae.method.backbones.BackboneConfig`), checked to cover that model, and notes on what was adapted.

    timm's own checkpoints load as they are; a MoCo v3 release gives its query ViT (``base_encoder.*`` without the
    projector); a BEiT / USFM checkpoint's shared relative position bias (``rel_pos_bias.*``) is copied into every
    block. The classifier (and ``fc_norm``, which pre-training checkpoints lack) may be missing: they are new.
    Resizing to another image size, the input-conv channels and the classifier reset are left to timm's loader.

    Raises:
        D2maeError: a file that does not hold a state dict, or one that lacks tensors of the model (another
            architecture or layout), naming the first ones.
    """

    state = load_checkpoint_file(path)
    notes: list[str] = []
    layout = checkpoint_layout(state)
    if layout == "moco-v3":
        state = {k[len("base_encoder."):]: v for k, v in state.items()
                 if k.startswith("base_encoder.") and not k.startswith("base_encoder.head.")}
        notes.append("MoCo v3 release: the query ViT (base_encoder) without its projector")
    reference = TimmClassifier(config, 2, 0.0, None).model  # random: the names and shapes the file must cover
    expected = reference.state_dict()
    shared = state.pop("rel_pos_bias.relative_position_bias_table", None)
    if shared is not None:
        blocks = sorted({k.rsplit(".attn.", 1)[0] for k in expected if k.endswith("attn.relative_position_bias_table")})
        for b in blocks:
            state.setdefault(f"{b}.attn.relative_position_bias_table", shared.clone())
        notes.append(f"shared relative position bias copied into {len(blocks)} blocks")
    state = {k: v for k, v in state.items() if "relative_position_index" not in k}
    classifier = reference.pretrained_cfg.get("classifier") or "head"
    heads = tuple(c + "." for c in ((classifier,) if isinstance(classifier, str) else classifier)) + ("fc_norm.",)
    missing = [k for k in expected if k not in state and not k.startswith(heads)]
    if missing:
        raise D2maeError(f"weights file {path} does not match {config.backbone}: {len(missing)} of the model's "
                         f"tensors are not in it (e.g. {_short(missing, 3)}); is it a checkpoint of another "
                         "architecture or layout?", option="backbone_weights")
    unused = sorted(k for k in state if k not in expected)
    if unused:
        notes.append(f"not used from the file: {_short(unused)}")
    return {k: v for k, v in state.items() if k in expected}, notes



"""Export a pre-trained D²MAE encoder for timm or Hugging Face ``transformers`` (``d2mae export``).

The encoder's input sequence is Eq. 2 of the paper, ``z_0 = [CLS, BLU(t), E_1, …, E_N] + P`` with
``P ∈ R^{(N+2)×D}`` and ``BLU(t) = b + sin-emb(t)`` (Section 2.2). For one fixed blur level t that is *exactly* a
timm ``VisionTransformer`` with one register token (``reg_tokens=1``, ``no_embed_class=False``): timm concatenates
``[cls, reg, patches]`` and then adds a position embedding over all N + 2 tokens. The export therefore bakes
``BLU(t)`` into timm's ``reg_token``. The two other conditionings of Table 3b are baked as exactly:

- ``add``: sin-emb(t) is added to every patch embedding, i.e. to the patch projection's output, so it is folded
  into ``patch_embed.proj.bias``;
- ``none``: nothing to bake.

What a timm (or ``transformers``) model does *not* do is the first step of the d2mae encoder: blur the [0, 1] image
at σ_t (Eq. 1) and standardise it with the data set's mean/std. Users feed ``(G_σt(x) - mean) / std``; the
exported config carries mean/std (timm ``pretrained_cfg``, HF ``preprocessor_config.json``) and
``d2mae_export.json`` records t and σ_t. With the default level t = 1 of the paper's schedule (σ_1 = 0.1) the blur
is the identity (the Gaussian kernel's radius ``int(4σ + 0.5)`` is 0), so plain normalised images are right.

Hugging Face: the ``token`` mode becomes a ``Dinov2WithRegistersModel`` (a ViT whose register token sits after CLS
and, like timm's, gets no position embedding of its own, so ``BLU(t) + P_1`` is baked into it) with layer scale
fixed to 1; ``add`` and ``none`` become a plain ``ViTModel``. Both are exact; both load with
``transformers.AutoModel.from_pretrained(folder)``.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from d2mae.io.artifacts import CONFIG, WEIGHTS, load_pretrained, save_weights
from d2mae.method.blur import TRUNCATE, sinusoidal_embedding
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurEncoder
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_json, atomic_write_text
from d2mae.runtime.locks import output_lock
from d2mae.runtime.options import check_fields
from d2mae.runtime.outputs import claim_folder

EXPORT_FORMATS = ("timm", "hf")
EXPORT_INFO = "d2mae_export.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
TIMM_LAYER_NORM_EPS = 1e-6  # timm's VisionTransformer LayerNorm; not settable from a timm config.json
DEFAULT_BLUR_LEVEL = 1  # σ_1: the lightest blur of the schedule; an identity at the paper's σ_1 = 0.1


@dataclass
class ExportConfig:
    """Options of ``d2mae export`` (every field is also a flag and a YAML key)."""

    pretrained: str = field(default="", metadata={"help": "pre-trained d2mae folder (written by d2mae pretrain)",
                                                  "metavar": "DIR", "old_names": ["model"]})
    out: str = field(default="", metadata={"help": "output folder for the exported model", "metavar": "DIR"})
    format: str = field(default="timm", metadata={"help": "target library: timm or hf (transformers)",
                                                  "choices": list(EXPORT_FORMATS)})
    blur_level: float | None = field(default=None, metadata={
        "help": "blur level t whose BLU(t) is baked in (0..T; default: most common t* of --obs-table, else 1)",
        "metavar": "T", "min": 0.0})
    sigma: float | None = field(default=None, metadata={"advanced": True,
        "help": "give the blur level as its σ instead of --blur-level", "metavar": "S", "min": 0.0})
    obs_table: str | None = field(default=None, metadata={
        "help": "CSV with a t_star column (e.g. a fine-tuning run's predictions.csv); its most common t* is used",
        "metavar": "CSV"})
    force: bool = field(default=False, metadata={
        "help": "replace an earlier export in --out, or write beside other files there (never over them)"})

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.pretrained:
            raise D2maeError("is required: the pre-trained d2mae folder to export", option="pretrained")
        if not self.out:
            raise D2maeError("is required: the folder to write the exported model to", option="out")
        if self.format not in EXPORT_FORMATS:
            raise D2maeError(f"unknown value '{self.format}'; use timm or hf", option="format")
        if self.blur_level is not None and self.sigma is not None:
            raise D2maeError("options --blur-level and --sigma both given; give one of them")


# ---------------------------------------------------------------------------------------------------------------
# the blur level to bake


def most_common_t_star(path: str | Path) -> float:
    """The most frequent ``t_star`` of a CSV (ties go to the lower level, the lighter blur)."""
    path = Path(path)
    if not path.is_file():
        raise D2maeError(f"file {path} does not exist", option="obs_table")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            cells = [(row.get("t_star") or "").strip() for row in reader] if "t_star" in columns else []
    except (UnicodeDecodeError, csv.Error) as exc:
        raise D2maeError(f"{path} is not a readable CSV ({exc})", option="obs_table") from None
    if "t_star" not in columns:
        raise D2maeError(f"{path} has no 't_star' column; give a predictions.csv or an "
                         "OBS table, or choose the level with --blur-level", option="obs_table")
    try:
        values = [float(cell) for cell in cells if cell]
    except ValueError:
        raise D2maeError(f"{path} has a non-numeric t_star value", option="obs_table") from None
    if not values:
        raise D2maeError(f"{path} has no t_star values", option="obs_table")
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


def resolve_blur_level(config: ModelConfig, t: float | None = None, sigma: float | None = None,
                       obs_table: str | Path | None = None) -> float:
    """The level t to bake: ``t`` or ``sigma`` if given, else the most common t* of ``obs_table``, else 1.

    A model pre-trained without blur (MAE) has only level 0. Fractional levels are allowed (a σ between grid
    points): the sinusoidal embedding of Section 2.2 is defined for any real t.
    """
    schedule = config.schedule
    top = schedule.num_levels
    if t is not None and sigma is not None:
        raise D2maeError("options --blur-level and --sigma both given; give one of them")
    if sigma is not None:
        if not (math.isfinite(sigma) and sigma >= 0):
            raise D2maeError(f"must be a number ≥ 0, got {sigma}", option="sigma")
        return schedule.level_of(sigma)
    if t is None and obs_table is not None:
        t = most_common_t_star(obs_table)
    if t is None:
        return float(DEFAULT_BLUR_LEVEL) if top else 0.0
    if not (math.isfinite(t) and 0 <= t <= top):
        raise D2maeError(f"must be in 0..{top} (T = {top} levels for this model), got {t}"
                         + ("; the model was pre-trained without blur, use 0" if not top else ""), option="blur_level")
    return float(t)


# ---------------------------------------------------------------------------------------------------------------
# encoder → timm VisionTransformer


def timm_architecture(config: ModelConfig) -> str:
    """The timm registry name of the architecture (``vit_base_patch16`` → ``vit_base_patch16_224``)."""
    return f"{config.arch}_224"


def timm_model_args(config: ModelConfig) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments that rebuild the encoder's architecture exactly."""
    return {
        "img_size": config.img_size,
        "patch_size": config.patch_size,
        "in_chans": config.in_chans,
        "embed_dim": config.embed_dim,
        "depth": config.depth,
        "num_heads": config.num_heads,
        "mlp_ratio": config.mlp_ratio,
        "qkv_bias": True,
        "class_token": True,
        "reg_tokens": 1 if config.blur_embed == "token" else 0,  # BLU(t) rides in timm's register token
        "no_embed_class": False,  # P covers the prefix tokens too (Eq. 2)
        "global_pool": "avg",  # mean of the patch tokens, as the d2mae classifier pools
        "fc_norm": False,  # the encoder's final LayerNorm stays on every token (forward_features == latent)
        "num_classes": 0,
    }


def encoder_to_timm_state(encoder: DeblurEncoder, t: float) -> dict[str, torch.Tensor]:
    """The encoder's weights in timm ``VisionTransformer`` names, with BLU(t) baked in (see module docstring)."""
    config = encoder.config
    state = {k: v.detach().float().clone() for k, v in encoder.state_dict().items()
             if k not in ("pixel_mean", "pixel_std", "blur_token")}
    emb = sinusoidal_embedding(torch.tensor([t]), config.embed_dim)[0]  # [D], the fixed part of BLU(t)
    if config.blur_embed == "token":
        state["reg_token"] = (encoder.blur_token.detach().float() + emb).clone()  # [1, 1, D] = BLU(t)
    elif config.blur_embed == "add":
        state["patch_embed.proj.bias"] = state["patch_embed.proj.bias"] + emb  # E_i + sin-emb(t), exact
    state["pos_embed"] = state["pos_embed"].reshape(1, -1, config.embed_dim)  # [1, prefix + N, D]
    return state


def _floats(values: torch.Tensor) -> list[float]:
    """A float32 buffer as JSON numbers without float32 noise (0.33, not 0.33000001311302185)."""
    return [float(f"{float(v):.7g}") for v in values.flatten()]


def _timm_pretrained_cfg(encoder: DeblurEncoder) -> dict[str, Any]:
    """timm ``pretrained_cfg`` for the export: the data set's own mean/std and the encoder's input size."""
    config = encoder.config
    return {
        "tag": "d2mae",
        "custom_load": False,
        "input_size": [config.in_chans, config.img_size, config.img_size],
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 1.0,  # d2mae's deterministic view: resize the shorter side, centre crop
        "crop_mode": "center",
        "mean": _floats(encoder.pixel_mean),
        "std": _floats(encoder.pixel_std),
        "num_classes": 0,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def _check_timm(config: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """Check the converted weights against timm's own model (built on the meta device: names and shapes only)."""
    with torch.device("meta"):
        model = timm.create_model(timm_architecture(config), pretrained=False, **timm_model_args(config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:  # a mismatch here is a d2mae bug, not a user error
        diff = sorted(set(expected.items()) ^ set(got.items()))[:5]
        raise RuntimeError(f"d2mae export produced weights timm's {timm_architecture(config)} does not accept: {diff}")


def _export_info(encoder: DeblurEncoder, source: Path, target: str, t: float, extra: dict[str, Any]) -> dict:
    config = encoder.config
    sigma = float(config.schedule.sigma(torch.tensor([t]))[0])
    return {
        "format": "d2mae-export", "format_version": 1, "target": target,
        "source": str(source), "blur_embed": config.blur_embed, "blur_level": t, "sigma": round(sigma, 6),
        "blur_is_identity": int(TRUNCATE * sigma + 0.5) == 0,  # kernel radius 0 (blur.blur_matrix)
        "mean": _floats(encoder.pixel_mean),
        "std": _floats(encoder.pixel_std),
        "preprocess": "x in [0,1] -> d2mae.method.blur.gaussian_blur(x, sigma) -> (x - mean) / std",
        "model": config.to_dict(), **extra,
    }


def _warn_layer_norm_eps(encoder: DeblurEncoder, target: str) -> None:
    eps = encoder.norm.eps
    if target == "timm" and eps != TIMM_LAYER_NORM_EPS:
        warnings.warn(f"this d2mae model's LayerNorms use eps={eps}; timm's ViT uses {TIMM_LAYER_NORM_EPS}, so the "
                      "exported features differ slightly from d2mae's", stacklevel=3)


def export_timm(encoder: DeblurEncoder, out_dir: Path, t: float, source: Path) -> Path:
    """Write a timm model folder: ``config.json`` (timm's pretrained-config format) + ``model.safetensors``."""
    config = encoder.config
    _warn_layer_norm_eps(encoder, "timm")
    state = encoder_to_timm_state(encoder, t)
    _check_timm(config, state)
    model_args = timm_model_args(config)
    timm_config = {
        "architecture": timm_architecture(config),
        "num_classes": 0,
        "num_features": config.embed_dim,
        "global_pool": model_args["global_pool"],
        "model_args": model_args,
        "pretrained_cfg": _timm_pretrained_cfg(encoder),
    }
    save_weights(state, out_dir / WEIGHTS, metadata={"format": "pt"})
    atomic_write_json(out_dir / CONFIG, timm_config)
    if (out_dir / EXPORT_INFO).is_file():  # an earlier hf export into the same folder
        (out_dir / PREPROCESSOR_CONFIG).unlink(missing_ok=True)
    atomic_write_json(out_dir / EXPORT_INFO, _export_info(encoder, source, "timm", t, {
        "timm": {"architecture": timm_config["architecture"], "model_args": model_args}}))
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# encoder → Hugging Face transformers (ViTModel, or Dinov2WithRegistersModel for the blur token)


def timm_to_hf_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """timm ViT names → ``transformers`` names (the long-standing checkpoint layout that every version reads).

    ``token`` mode → ``Dinov2WithRegistersModel`` (register token = BLU(t) + P_1, layer scale 1);
    ``add`` / ``none`` → ``ViTModel``.
    """
    dim, registers = config.embed_dim, config.blur_embed == "token"
    pos = state["pos_embed"]  # [1, prefix + N, D]
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    if registers:
        # Dinov2WithRegisters adds P to [CLS, patches] and inserts the register after it: bake P_1 into the token
        out["embeddings.register_tokens"] = state["reg_token"] + pos[:, 1:2]  # [1, 1, D]
        out["embeddings.position_embeddings"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)  # [1, 1 + N, D]
        out["embeddings.mask_token"] = torch.zeros(1, dim)  # unused at inference, always present in the layout
    else:
        out["embeddings.position_embeddings"] = pos
    for i in range(config.depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        q, k, v = state[src + "attn.qkv.weight"].chunk(3, dim=0)  # [D, D] each
        qb, kb, vb = state[src + "attn.qkv.bias"].chunk(3, dim=0)
        for name, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[dst + f"attention.attention.{name}.weight"] = w
            out[dst + f"attention.attention.{name}.bias"] = b
        out[dst + "attention.output.dense.weight"] = state[src + "attn.proj.weight"]
        out[dst + "attention.output.dense.bias"] = state[src + "attn.proj.bias"]
        if registers:
            names = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
            out[dst + "layer_scale1.lambda1"] = torch.ones(dim)
            out[dst + "layer_scale2.lambda1"] = torch.ones(dim)
        else:
            names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense",
                     "mlp.fc2": "output.dense"}
        for ours, theirs in names.items():
            out[dst + theirs + ".weight"] = state[src + ours + ".weight"]
            out[dst + theirs + ".bias"] = state[src + ours + ".bias"]
    return {k: v.contiguous() for k, v in out.items()}


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise D2maeError("hf needs the 'transformers' package: pip install 'd2mae[hf]' "
                         "(or use --format timm, which needs nothing extra)", option="format") from None
    return transformers


def hf_config(encoder: DeblurEncoder) -> Any:
    """The ``transformers`` config object of the export (ViTConfig, or Dinov2WithRegistersConfig for ``token``)."""
    transformers = _import_transformers()
    config = encoder.config
    ratio = config.mlp_ratio
    common = dict(hidden_size=config.embed_dim, num_hidden_layers=config.depth, num_attention_heads=config.num_heads,
                  hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  layer_norm_eps=encoder.norm.eps, image_size=config.img_size, patch_size=config.patch_size,
                  num_channels=config.in_chans, qkv_bias=True)
    if config.blur_embed == "token":
        if not hasattr(transformers, "Dinov2WithRegistersConfig"):
            raise D2maeError(f"hf: a blur-token model needs transformers ≥ 4.48 "
                             f"(Dinov2WithRegistersModel); found {transformers.__version__}; upgrade it", option="format")
        cfg = transformers.Dinov2WithRegistersConfig(
            mlp_ratio=int(ratio) if float(ratio).is_integer() else ratio,  # an int field in transformers 5
            layerscale_value=1.0, drop_path_rate=0.0, use_swiglu_ffn=False,
            num_register_tokens=1, **common)
        cfg.architectures = ["Dinov2WithRegistersModel"]
    else:
        cfg = transformers.ViTConfig(intermediate_size=int(config.embed_dim * config.mlp_ratio),
                                     encoder_stride=config.patch_size,
                                     **common)
        cfg.architectures = ["ViTModel"]
    return cfg


def export_hf(encoder: DeblurEncoder, out_dir: Path, t: float, source: Path) -> Path:
    """Write a ``transformers`` folder: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``."""
    transformers = _import_transformers()
    config = encoder.config
    cfg = hf_config(encoder)
    state = timm_to_hf_state(encoder_to_timm_state(encoder, t), config)
    mean, std = _floats(encoder.pixel_mean), _floats(encoder.pixel_std)
    processor = transformers.ViTImageProcessor(
        do_resize=True, size={"height": config.img_size, "width": config.img_size}, resample=3,  # bicubic
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=mean, image_std=std)
    save_weights(state, out_dir / WEIGHTS, metadata={"format": "pt"})
    atomic_write_text(out_dir / CONFIG, cfg.to_json_string(use_diff=True))
    atomic_write_text(out_dir / PREPROCESSOR_CONFIG, processor.to_json_string())
    atomic_write_json(out_dir / EXPORT_INFO, _export_info(encoder, source, "hf", t, {
        "hf": {"architecture": cfg.architectures[0], "transformers_version": transformers.__version__}}))
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# the library function and the command


def _check_out_dir(pretrained_dir: Path, out_dir: Path, force: bool = False,
                   obs_table: str | Path | None = None) -> None:
    if out_dir.resolve() == pretrained_dir.resolve():
        raise D2maeError(f"{out_dir} is the pre-trained folder itself; choose another folder", option="out")
    if out_dir.exists() and not out_dir.is_dir():
        raise D2maeError(f"{out_dir} exists and is not a folder; choose a folder path", option="out")
    existing = out_dir / CONFIG
    if existing.is_file():
        text = existing.read_text(encoding="utf-8", errors="replace")
        if '"d2mae-pretrained"' in text or '"d2mae-classifier"' in text:
            raise D2maeError(f"{out_dir} holds a d2mae model folder; export into another folder", option="out")
    claim_folder(out_dir, "export", [pretrained_dir, obs_table], force=force)


def export_encoder(pretrained_dir: str | Path, out_dir: str | Path, format: str = "timm", t: float | None = None,
                   *, sigma: float | None = None, obs_table: str | Path | None = None, force: bool = False) -> Path:
    """Export the encoder of a pre-trained d2mae folder as a timm or ``transformers`` model folder.

    Args:
        pretrained_dir: folder written by ``d2mae pretrain`` (:func:`d2mae.io.artifacts.save_pretrained`).
        out_dir: folder to write; created if needed. Existing export files in it are replaced atomically.
        format: ``timm`` or ``hf``.
        t: the blur level whose BLU(t) is baked in (default: most common t* of ``obs_table``, else 1).
        sigma: the level given as its σ instead (must lie inside the model's schedule).
        obs_table: CSV with a ``t_star`` column (a fine-tuning run's ``predictions.csv``).
        force: write into an existing folder that holds other files than an earlier export.

    Returns:
        ``out_dir``. Inputs to the exported model: [0, 1] images blurred at σ_t, then ``(x - mean) / std`` with the
        mean/std written in its config (recorded with t and σ_t in ``d2mae_export.json``).
    """
    if format not in EXPORT_FORMATS:
        raise D2maeError(f"unknown value '{format}'; use timm or hf", option="format")
    pretrained_dir, out_dir = Path(pretrained_dir), Path(out_dir)
    if format == "hf":
        _import_transformers()  # fail before any work
    _check_out_dir(pretrained_dir, out_dir, force, obs_table)
    with output_lock(out_dir, "export"):  # a writable folder, and one writer, before any work
        model = load_pretrained(pretrained_dir)
        level = resolve_blur_level(model.config, t, sigma, obs_table)
        with torch.no_grad():
            if format == "timm":
                return export_timm(model.encoder, out_dir, level, pretrained_dir)
            return export_hf(model.encoder, out_dir, level, pretrained_dir)



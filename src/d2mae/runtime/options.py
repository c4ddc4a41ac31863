"""Typed run configurations: plain dataclasses, readable from YAML, with every option's domain declared once.

Every field of a config dataclass is a YAML key and (in :mod:`d2mae.commands`) a flag (``img_size`` ->
``--img-size``). Precedence, lowest first: dataclass defaults < preset < YAML file < flags (:func:`build_config`).
Unknown keys and values of the wrong type are refused with a :class:`~d2mae.runtime.errors.D2maeError` that names
the key and the file.

The domain of a field lives in its metadata and nowhere else, and :func:`check_fields` (called by each config's
``__post_init__``) enforces it, so the command line, YAML files, the Python API and the ``config.json`` of a saved
model are checked alike::

    epochs: int = field(default=400, metadata={"help": "...", "min": 1})
    mask_ratio: float = field(default=0.75, metadata={"min": 0.0, "below": 1.0})
    device: str = field(default="auto", metadata={"volatile": True})   # does not change what a run computes

Keys: ``min``/``max`` (inclusive), ``above``/``below`` (exclusive), ``choices``; numbers must also be finite.
``volatile`` marks options that do not change results (devices, workers, logging): a resumed run may change them,
and experiment cache keys leave them out (:func:`result_fields`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from d2mae.runtime.errors import D2maeError, shown
from d2mae.runtime.files import atomic_write_text

_NONE_WORDS = {"none", "null", "~"}


def _describe(tp: Any) -> tuple[Any, Any, bool]:
    """Split an annotation into (container, scalar type, optional): ``list[str] | None`` -> (list, str, True)."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"unsupported config annotation {tp!r}")
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return list, typing.get_args(tp)[0], optional
    if origin is dict:
        return dict, typing.get_args(tp)[1], optional
    return None, tp, optional


def _scalar(value: Any, tp: Any, key: str, source: str) -> Any:
    """Coerce one scalar from YAML or a flag to ``tp``, or explain what was expected."""
    expected = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"true", "yes", "1", "false", "no", "0"}:
                return value.lower() in {"true", "yes", "1"}
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise D2maeError(f"option '{key}' in {source} must be {expected}, got {shown(value)}") from None
    raise TypeError(f"unsupported config type {tp!r}")


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Coerce ``value`` to the annotation ``tp`` (scalars, optionals, lists and str-keyed mappings of scalars)."""
    container, inner, optional = _describe(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in _NONE_WORDS):
        if optional:
            return None
        raise D2maeError(f"option '{key}' in {source} must be set (it cannot be empty)")
    if container is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_scalar(v, inner, key, source) for v in items]
    if container is dict:
        if not isinstance(value, dict):
            raise D2maeError(f"option '{key}' in {source} must be a mapping (name: value), got {type(value).__name__}")
        return {str(k): _scalar(v, inner, f"{key}.{k}", source) for k, v in value.items()}
    return _scalar(value, inner, key, source)


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing file or bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise D2maeError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise D2maeError(f"config file {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise D2maeError(f"config file {path} must hold a mapping of option: value, not {type(data).__name__}")
    if _count_values(data, MAX_VALUES) > MAX_VALUES:
        raise D2maeError(f"config file {path} expands to more than {MAX_VALUES:,} values (YAML aliases repeating "
                         "themselves?); a d2mae config is a few dozen options")
    return data


MAX_VALUES = 100_000  # a config's values, counting every repeat of a YAML alias


def _count_values(data: Any, limit: int) -> int:
    """The values in ``data`` as a reader would see them (aliases counted each time), stopping past ``limit``: a
    266-byte alias bomb is caught in microseconds instead of expanding to a billion values."""
    count, stack = 0, [data]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


#: The sections a nested YAML file may group its options in (each field's ``group``; flat keys work as well).
SECTIONS = ("data", "model", "obs", "optim", "runtime")


def flatten_sections(cls: type, mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping with its nested sections (``model: {arch: …}``, ``optim: {epochs: …}``) merged into one
    level. A key that is also a field of ``cls`` is a section only when its value is a mapping and the field is
    not one (``data: [images/]`` is pre-training's image list, ``model: vit_base_patch16`` its old spelling)."""
    types_ = field_types(cls)
    flat: dict[str, Any] = {}
    for raw_key, value in mapping.items():
        key = str(raw_key).replace("-", "_")
        own = types_.get(key)
        if key in SECTIONS and isinstance(value, Mapping) and (own is None or _describe(own)[0] is not dict):
            flat.update(value)
        else:
            flat[raw_key] = value
    return flat


def canonical_key(cls: type, raw_key: Any, source: str) -> str:
    """The field name of a key as written (dashes or underscores, an alias, or an old spelling). An old spelling
    (a field's ``old_names``) works, with a one-line note that names the new one."""
    key = str(raw_key).replace("-", "_")
    for f in dataclasses.fields(cls):
        if key in f.metadata.get("aliases", ()):
            return f.name
        if key in f.metadata.get("old_names", ()):
            new = f"--{f.name.replace('_', '-')}" if source == CLI else f"'{f.name}'"
            old = f"--{key.replace('_', '-')}" if source == CLI else f"'{raw_key}' in {source}"
            warnings.warn(f"{old} is now {new}; the old name still works in this release", FutureWarning,
                          stacklevel=3)
            return f.name
    return key


CLI = "the command line"  # the source name of flags


def build_config(cls: type, *layers: tuple[Mapping[str, Any] | None, str]) -> Any:
    """Merge (mapping, source-name) layers over the dataclass defaults, checking keys and types.

    Keys may be written with dashes or underscores, in nested sections (:func:`flatten_sections`) or by an older
    name (:func:`canonical_key`). Later layers win. The dataclass's ``__post_init__`` runs its own value checks
    (ranges, choices) and raises :class:`D2maeError`.
    """
    types_ = field_types(cls)
    merged: dict[str, Any] = {}
    for mapping, source in layers:
        for raw_key, value in flatten_sections(cls, mapping or {}).items():
            key = canonical_key(cls, raw_key, source)
            if key not in types_:
                close = [k for k in types_ if k.split("_")[0] == key.split("_")[0]]
                hint = f"; did you mean {', '.join(close)}?" if close else f"; known options: {', '.join(types_)}"
                raise D2maeError(f"unknown option '{raw_key}' in {source}{hint}")
            merged[key] = coerce(value, types_[key], key, source)
    return cls(**merged)


_MISSING = object()
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
          list: "a list"}


def saved_value(data: Any, key: str, kind: type, source: str, default: Any = _MISSING, *, low: float | None = None,
                choices: Sequence[Any] | None = None) -> Any:
    """One value read back from a saved file (``config.json``, ``run.json``, …), checked by type and range: a
    damaged or hand-edited file is one line that names the file and the key, never a traceback further on.

    ``default``: the value when the key is absent or null (without one, the key is required); ``low``: the least
    value of a number; ``choices``: the values allowed."""
    value = data.get(key) if isinstance(data, Mapping) else None
    if value is None:
        if default is _MISSING:
            raise D2maeError(f"{source}: '{key}' is missing; the file is damaged — write it again with d2mae")
        return default
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else isinstance(value, kind))
    if not ok or (low is not None and value < low) or (choices is not None and value not in choices):
        want = _KINDS.get(kind, kind.__name__) + (f" ≥ {low:g}" if low is not None else "") + (
            f" (one of {', '.join(map(str, choices))})" if choices is not None else "")
        raise D2maeError(f"{source}: '{key}' must be {want}, got {shown(value)}; the file is damaged — write it again "
                         "with d2mae")
    return float(value) if kind is float else value


def check_saved_types(cls: type, data: Mapping[str, Any], source: str) -> None:
    """Every value of a saved artefact (``config.json``, ``run.json``) that is a field of ``cls`` has that field's
    JSON type: no coercion of text as the command line does (``"32"`` is not an integer here), so a damaged or
    hand-edited file is one error naming the file and the key."""
    types_ = field_types(cls)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    plural = {int: "a list of integers", float: "a list of numbers", str: "a list of strings",
              bool: "a list of true/false"}
    for key, value in data.items():
        if key not in types_:
            continue
        container, inner, optional = _describe(types_[key])
        if value is None:
            if optional:
                continue
            raise D2maeError(f"{source}: '{key}' must be {names.get(inner, str(inner))}, got null")
        items = value if container is list else [value]
        if container is list and not isinstance(value, list):
            raise D2maeError(f"{source}: '{key}' must be a list, got {shown(value)}")
        for item in items:
            ok = (isinstance(item, bool) if inner is bool else
                  isinstance(item, int) and not isinstance(item, bool) if inner is int else
                  isinstance(item, (int, float)) and not isinstance(item, bool) if inner is float else
                  isinstance(item, str) if inner is str else True)
            if not ok:
                what = plural[inner] if container is list else names.get(inner, str(inner))
                raise D2maeError(f"{source}: '{key}' must be {what}, got {shown(value)}")


THREADS_HELP = ("CPU threads of PyTorch (default: $OMP_NUM_THREADS, else one per core this process may use, shared "
                "among torchrun's processes on the node; docs/threads.md)")


@dataclasses.dataclass
class RuntimeOptions:
    """Where and how a command runs, declared once for every command that computes (pretrain, obs, finetune,
    predict). None of them changes what a run computes (``volatile``: a resumed run may change them, and
    experiment cache keys leave them out); a command may give a field another default."""

    device: str = dataclasses.field(default="auto", metadata={
        "help": "auto (CUDA when available), cpu, cuda or cuda:N", "volatile": True})
    precision: str = dataclasses.field(default="auto", metadata={
        "help": "auto (bf16 autocast on CUDA GPUs that support it and on CPUs with native bf16 units for an encoder "
                "at least 192 wide (ViT-Tiny), else fp32), bf16 or fp32; the OBS search always runs in fp32",
        "choices": ["auto", "bf16", "fp32"], "volatile": True})
    workers: int | None = dataclasses.field(default=2, metadata={
        "help": "DataLoader worker processes that decode images", "min": 0, "volatile": True})
    threads: int | None = dataclasses.field(default=None, metadata={"help": THREADS_HELP, "min": 1, "volatile": True})
    skip_bad: bool = dataclasses.field(default=False, metadata={
        "help": "leave out unreadable images (listed in bad_images.txt in the output folder) instead of stopping",
        "volatile": True})
    progress: bool = dataclasses.field(default=True, metadata={
        "advanced": True, "help": "show progress bars", "volatile": True})


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def _domain(meta: Mapping[str, Any], integer: bool) -> str:
    """The domain of a field in words: ``an integer ≥ 1``, ``a number in [0, 1)``."""
    kind = "an integer" if integer else "a number"
    lo = ("[", meta["min"]) if "min" in meta else ("(", meta["above"]) if "above" in meta else None
    hi = ("]", meta["max"]) if "max" in meta else (")", meta["below"]) if "below" in meta else None
    if lo and hi:
        return f"{kind} in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{kind} {'≥' if lo[0] == '[' else '>'} {lo[1]:g}"
    if hi:
        return f"{kind} {'≤' if hi[0] == ']' else '<'} {hi[1]:g}"
    return kind


def check_fields(obj: Any) -> None:
    """Check every field of the dataclass instance ``obj`` against its metadata's domain (module docstring).

    Raises:
        D2maeError: with ``option`` = the field's name, saying the domain and the value given.
    """
    for f in dataclasses.fields(obj):
        meta = f.metadata
        value = getattr(obj, f.name)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if "choices" in meta:
            for v in values:
                if v not in meta["choices"]:
                    raise D2maeError(f"unknown value {shown(v)}; use one of {', '.join(map(str, meta['choices']))}",
                                     option=f.name)
        if not any(k in meta for k in ("min", "max", "above", "below")):
            continue
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # the type was checked where the value came in (coerce)
            integer = isinstance(v, int)
            ok = math.isfinite(v)
            ok = ok and ("min" not in meta or v >= meta["min"]) and ("max" not in meta or v <= meta["max"])
            ok = ok and ("above" not in meta or v > meta["above"]) and ("below" not in meta or v < meta["below"])
            if not ok:
                raise D2maeError(f"must be {_domain(meta, integer)}, got {v}", option=f.name)


def result_fields(cls: type) -> list[str]:
    """The fields of a config dataclass that change what a run computes (all but the ``volatile`` ones)."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("volatile")]

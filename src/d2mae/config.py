"""Typed run configurations: one dataclass per command, readable from YAML and from command-line flags.

Every field of a config dataclass is also a flag (``img_size`` -> ``--img-size``) and a YAML key, so that
"every option of the config file can be given on the command line and vice versa". Precedence, lowest first:
dataclass defaults < preset < YAML file (``--config``) < flags given on the command line. Unknown keys and values of
the wrong type are refused with a :class:`~d2mae.errors.D2maeError` that names the key and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from d2mae.errors import D2maeError
from d2mae.runtime import atomic_write_text

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
        raise D2maeError(f"option '{key}' in {source} must be {expected}, got {value!r}") from None
    raise TypeError(f"unsupported config type {tp!r}")


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Coerce ``value`` to the annotation ``tp`` (scalars, optionals and lists of scalars)."""
    container, inner, optional = _describe(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in _NONE_WORDS):
        if optional:
            return None
        raise D2maeError(f"option '{key}' in {source} must be set (it cannot be empty)")
    if container is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_scalar(v, inner, key, source) for v in items]
    return _scalar(value, inner, key, source)


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def add_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per field of the dataclass ``cls``; unset flags stay out of the parsed namespace."""
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        container, inner, optional = _describe(field_types(cls)[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if default not in (None, "", []) and "default" not in help_text:  # the help may say it in its own words
            help_text = f"{help_text} (default: {default})".strip()
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text.replace("%", "%%"), "dest": f.name}
        if inner is bool and container is None:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if container is list:
            kwargs["nargs"] = "+"
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        kwargs["metavar"] = f.metadata.get("metavar", inner.__name__.upper() if isinstance(inner, type) else "VALUE")
        parser.add_argument(flag, type=str, **kwargs)


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
    return data


def build_config(cls: type, *layers: tuple[Mapping[str, Any] | None, str]) -> Any:
    """Merge (mapping, source-name) layers over the dataclass defaults, checking keys and types.

    Keys may be written with dashes or underscores. Later layers win. The dataclass's ``__post_init__`` runs its
    own value checks (ranges, choices) and raises :class:`D2maeError`.
    """
    types_ = field_types(cls)
    merged: dict[str, Any] = {}
    for mapping, source in layers:
        for raw_key, value in (mapping or {}).items():
            key = str(raw_key).replace("-", "_")
            if key not in types_:
                close = [k for k in types_ if k.split("_")[0] == key.split("_")[0]]
                hint = f"; did you mean {', '.join(close)}?" if close else f"; known options: {', '.join(types_)}"
                raise D2maeError(f"unknown option '{raw_key}' in {source}{hint}")
            merged[key] = coerce(value, types_[key], key, source)
    return cls(**merged)


def config_from_cli(cls: type, args: argparse.Namespace, preset: Mapping[str, Any] | None = None,
                    preset_name: str = "preset") -> Any:
    """Build ``cls`` from a preset, the YAML file named by ``args.config`` (if any) and the flags given."""
    flags = {k: v for k, v in vars(args).items() if k in field_types(cls)}
    file_layer: dict[str, Any] = {}
    if getattr(args, "config", None):
        file_layer = load_yaml(args.config)
    return build_config(cls, (preset, preset_name), (file_layer, str(getattr(args, "config", "config"))),
                        (flags, "the command line"))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))

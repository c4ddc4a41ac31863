"""Flags from config dataclasses: every field is a flag (``img_size`` -> ``--img-size``), and the flags given, over a
``--config`` YAML file, over the defaults, build the config (:func:`d2mae.runtime.options.build_config`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Mapping

from d2mae.runtime.options import RuntimeOptions, _describe, build_config, field_types, load_yaml


def flag(option: str) -> str:
    """A config field's flag: ``batch_size`` -> ``--batch-size``."""
    return "--" + option.replace("_", "-")

def add_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per field of the dataclass ``cls``; unset flags stay out of the parsed namespace."""
    runtime = {f.name for f in dataclasses.fields(RuntimeOptions)}
    ordered = sorted(dataclasses.fields(cls), key=lambda f: f.name in runtime)  # where/how it runs: listed last
    for f in ordered:
        if f.name in exclude:
            continue
        container, inner, optional = _describe(field_types(cls)[f.name])
        names = [flag(f.name)] + [flag(a) for a in f.metadata.get("aliases", ())]  # e.g. --workers, --num-workers
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if default not in (None, "", []) and "default" not in help_text:  # the help may say it in its own words
            help_text = f"{help_text} (default: {default})".strip()
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text.replace("%", "%%"), "dest": f.name}
        if inner is bool and container is None:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if container is list:
            kwargs["nargs"] = "+"
        if "choices" in f.metadata:
            kwargs["choices"] = [str(c) for c in f.metadata["choices"]]  # flags are text; the config coerces them
        kwargs["metavar"] = f.metadata.get("metavar", inner.__name__.upper() if isinstance(inner, type) else "VALUE")
        parser.add_argument(*names, type=str, **kwargs)


def add_with_positional(parser: argparse.ArgumentParser, cls: type, positional: str, help: str) -> None:
    """A positional list field of ``cls`` (images, sources: given here or by the YAML file), ``--config``, then one
    flag per other field; build the config with ``config_from_cli(cls, args, positional=positional)``."""
    parser.add_argument(positional, nargs="*", help=help)
    parser.add_argument("--config", help="YAML file with any of the options below")
    add_arguments(parser, cls, exclude=(positional,))


def config_from_cli(cls: type, args: argparse.Namespace, preset: Mapping[str, Any] | None = None,
                    preset_name: str = "preset", positional: str | None = None) -> Any:
    """Build ``cls`` from a preset, the YAML file named by ``args.config`` (if any) and the flags given; an empty
    ``positional`` list counts as not given (the YAML file may give it)."""
    flags = {k: v for k, v in vars(args).items() if k in field_types(cls) and not (k == positional and not v)}
    file_layer: dict[str, Any] = {}
    if getattr(args, "config", None):
        file_layer = load_yaml(args.config)
    return build_config(cls, (preset, preset_name), (file_layer, str(getattr(args, "config", "config"))),
                        (flags, "the command line"))

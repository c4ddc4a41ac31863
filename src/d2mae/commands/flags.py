"""Flags from config dataclasses: every field is a flag (``img_size`` -> ``--img-size``), and the flags given, over
``--set key=value`` values, over a ``--config`` YAML file, over the defaults, build the config
(:func:`d2mae.runtime.options.build_config`).

``--help`` lists what a person sets in a normal run, grouped by each field's ``group``; a field marked
``advanced`` is still a flag, a YAML key and a ``--set`` key, and ``--help-all`` lists it with its default. A
field's old spelling (``old_names``) is a hidden flag that still works, with a one-line note.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Mapping

import yaml

from d2mae.runtime.errors import D2maeError
from d2mae.runtime.options import CLI, RuntimeOptions, _describe, build_config, field_types, load_yaml

#: ``--help-all`` was given: the advanced options are listed too (set by the entry point before parsers are built).
SHOW_ALL = False
GROUP_TITLES = {"data": "the images and where the results go", "model": "the model",
                "obs": "optimal blurriness search (OBS)", "optim": "training", "runtime": "where and how it runs"}
OLD = "_old_"  # the dest prefix of an old spelling's hidden flag


def flag(option: str) -> str:
    """A config field's flag: ``batch_size`` -> ``--batch-size``."""
    return "--" + option.replace("_", "-")


def _group(f: dataclasses.Field) -> str:
    runtime = {g.name for g in dataclasses.fields(RuntimeOptions)}
    return f.metadata.get("group") or ("runtime" if f.name in runtime else "")


def add_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = (),
                  advanced: tuple[str, ...] = ()) -> None:
    """Add one flag per field of the dataclass ``cls`` (grouped by the fields' ``group``); unset flags stay out of
    the parsed namespace. Advanced fields (and those this command names in ``advanced``) are listed only under
    ``--help-all``."""
    sections: dict[str, Any] = {}
    order = list(GROUP_TITLES)
    ordered = sorted(dataclasses.fields(cls), key=lambda f: order.index(_group(f)) if _group(f) in order else -1)
    for f in ordered:
        if f.name in exclude:
            continue
        g = _group(f)
        target = parser
        if g in GROUP_TITLES:
            target = sections.get(g) or sections.setdefault(g, parser.add_argument_group(GROUP_TITLES[g]))
        _add_field(target, cls, f, f.name in advanced)


def _add_field(parser: Any, cls: type, f: dataclasses.Field, advanced: bool) -> None:
    container, inner, _ = _describe(field_types(cls)[f.name])
    help_text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    if default not in (None, "", []) and "default" not in help_text:  # the help may say it in its own words
        help_text = f"{help_text} (default: {default})".strip()
    hidden = (advanced or f.metadata.get("advanced")) and not SHOW_ALL
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name,
                              "help": argparse.SUPPRESS if hidden else help_text.replace("%", "%%")}
    names = [flag(f.name)] + [flag(a) for a in f.metadata.get("aliases", ())]  # e.g. --workers, --num-workers
    if inner is bool and container is None:
        parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if container is list:
        kwargs["nargs"] = "+"
    if "choices" in f.metadata:
        kwargs["choices"] = [str(c) for c in f.metadata["choices"]]  # flags are text; the config coerces them
    kwargs["metavar"] = f.metadata.get("metavar", inner.__name__.upper() if isinstance(inner, type) else "VALUE")
    parser.add_argument(*names, type=str, **kwargs)
    for old in f.metadata.get("old_names", ()):  # hidden; config_from_cli passes it on under its old name
        parser.add_argument(flag(old), **{**kwargs, "dest": OLD + old, "help": argparse.SUPPRESS})


def add_common(parser: argparse.ArgumentParser, config: bool = True) -> None:
    """``--config FILE``, ``--set KEY=VALUE`` and ``--help-all``, for a command whose options form a config."""
    if config:
        parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the options (flat or in "
                                                                  "sections data/model/obs/optim/runtime)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="_set",
                            help="set any option by its config key, e.g. --set layer_decay=0.75 (repeatable)")
    parser.add_argument("--help-all", action="store_true", help="list every option with its default, not only the "
                                                                 "common ones")


def add_with_positional(parser: argparse.ArgumentParser, cls: type, positional: str, help: str) -> None:
    """A positional list field of ``cls`` (images, sources: given here or by the YAML file), ``--config``, then one
    flag per other field; build the config with ``config_from_cli(cls, args, positional=positional)``."""
    parser.add_argument(positional, nargs="*", help=help)
    add_common(parser)
    add_arguments(parser, cls, exclude=(positional,))


def _set_values(pairs: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs as a mapping (values read as YAML: numbers, lists, true/false)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise D2maeError(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def config_from_cli(cls: type, args: argparse.Namespace, preset: Mapping[str, Any] | None = None,
                    preset_name: str = "preset", positional: str | None = None) -> Any:
    """Build ``cls`` from a preset, the YAML file named by ``args.config`` (if any), ``--set`` values and the flags
    given; an empty ``positional`` list counts as not given (the YAML file may give it)."""
    given = vars(args)
    flags = {k: v for k, v in given.items() if k in field_types(cls) and not (k == positional and not v)}
    flags.update({k[len(OLD):]: v for k, v in given.items() if k.startswith(OLD)})  # build_config notes the rename
    file_layer: dict[str, Any] = {}
    if getattr(args, "config", None):
        file_layer = load_yaml(args.config)
    return build_config(cls, (preset, preset_name), (file_layer, str(getattr(args, "config", "config"))),
                        (_set_values(given.get("_set") or []), "--set"), (flags, CLI))

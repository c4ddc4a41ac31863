"""The ``d2mae`` command: a thin layer that parses flags and calls the module that does the work.

Each command lives in its own module, which provides ``add_cli(parser)`` (its flags) and ``run_cli(args)`` (the
work; returns an exit status). Only the chosen command's module is imported. Input problems raise
:class:`~d2mae.errors.D2maeError`; they are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from d2mae.errors import D2maeError

# command: (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("d2mae.demo", "run the whole pipeline on synthetic phantoms in minutes on a CPU"),
    "phantoms": ("d2mae.phantom", "write synthetic ultrasound phantoms (PNG + labels.csv)"),
    "pretrain": ("d2mae.pretrain", "pre-train D²MAE (or MAE / DeblurrMAE / an ablation) on unlabeled images"),
    "obs": ("d2mae.obs", "optimal blurriness search: the best blur level t* per image"),
    "finetune": ("d2mae.finetune", "fine-tune a classifier from a pre-trained encoder, blurred at t*"),
    "evaluate": ("d2mae.evaluate", "metrics with 95% confidence intervals, tables and figures for a run"),
    "compare": ("d2mae.evaluate", "compare two runs with paired significance tests"),
    "predict": ("d2mae.predict", "classify new images (runs OBS on each first)"),
    "experiment": ("d2mae.experiment", "run every method of a config on every dataset and write a report"),
    "export": ("d2mae.export", "export a pre-trained encoder for timm or Hugging Face"),
}


def _usage() -> str:
    lines = ["usage: d2mae COMMAND [options]   (d2mae COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<11} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Start with `d2mae demo`; the README has a worked example on real images."]
    return "\n".join(lines)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 (warnings API)
    """Warnings on the command line are one line each, without the source line Python shows by default."""
    return f"d2mae: warning: {message}\n"


def build_parser(command: str) -> argparse.ArgumentParser:
    module_name, description = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"d2mae {command}", description=description)
    add = getattr(module, f"add_cli_{command}", None) or module.add_cli
    add(parser)
    parser.set_defaults(_run=getattr(module, f"run_cli_{command}", None) or module.run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from d2mae import __version__
        print(f"d2mae {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"d2mae: error: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
        return 2
    default_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv[1:])
        return int(args._run(args) or 0)
    except D2maeError as exc:
        print(f"d2mae {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"d2mae {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = default_format


if __name__ == "__main__":
    sys.exit(main())
